"""Evaluate a neox-jax checkpoint with lm-evaluation-harness.

    neox-jax evaluate --checkpoint ckpt/pythia-1b --tasks lambada_openai,piqa --output results.json
    neox-jax evaluate --checkpoint ckpt/pythia-1b --tasks piqa --batch_size auto --num_fewshot 0 \\
        --output_path out/ --log_samples                                       # lm-eval's own flag spellings

Tasks whose data is found locally (--data-dir, else $NEOX_JAX_DATA_DIR, else ../shared/data beside a checkout) run
from the local files through neox_jax/evaluation/tasks/ (same names, prompts and metrics as lm-eval's built-ins); any
other
task is lm-eval's built-in one (which downloads from the Hugging Face Hub); --hub forces the built-ins for all.
Prints lm-eval's table and a `Task | Metric | Value ± Stderr` table, and writes the full results JSON atomically
(--output FILE.json, or a folder: FOLDER/results.json); --log_samples writes each task's per-document records beside
it as samples_TASK.jsonl.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import time
from pathlib import Path

from neox_jax.errors import NeoXError

HELP = "evaluate a checkpoint on lm-evaluation-harness tasks (local data first, else lm-eval's built-ins)"


def _flag(p, name: str, **kw) -> None:
    """--some-flag, also spelled --some_flag as lm-eval does."""
    p.add_argument(name, "--" + name[2:].replace("-", "_"), **kw)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from neox_jax.evaluation.tasks import data
    from neox_jax.store.checkpoint import DTYPE_CHOICES

    p.add_argument(
        "--checkpoint", "--pretrained", required=True, help="neox-jax checkpoint directory (neox-jax convert ...)"
    )
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. lambada_openai,piqa")
    _flag(p, "--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument(
        "--limit",
        type=float,
        default=None,
        help="only the first N documents of each task (< 1: a fraction); for quick checks, not scores",
    )
    _flag(p, "--batch-size", default="8", help="rows per forward call, or auto (default 8)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="parameter dtype (default: as stored)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'data=2,model=4' (default: no mesh)")
    p.add_argument("--tokenizer", default=None, metavar="FILE", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--finetuned", default=None, help="fine-tuning run directory whose trained parameters to use")
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="a PEFT LoRA adapter directory, folded into the weights (docs/lora.md)",
    )
    p.add_argument(
        "--quantize",
        choices=("int8", "llm.int8"),
        default=None,
        help="int8 weights: weight-only, or LLM.int8 with outlier features in float (docs/int8.md)",
    )
    _flag(p, "--max-length", type=int, default=None, help="context length (default: the model's)")
    _flag(
        p,
        "--logprob-vocab",
        choices=("all", "tokenizer"),
        default="all",
        help="normalise log-probabilities over every output row (default, as lm-eval's hf backend) or over the "
        "tokenizer's ids only (as `neox-jax serve --logprob-vocab tokenizer`)",
    )
    _flag(p, "--include-path", default=None, help="a folder of extra lm-eval task YAMLs")
    _flag(
        p,
        "--data-dir",
        default=None,
        help=f"local data folder(s), joined by '{os.pathsep}' (default: ${data.ENV_VAR}, else ../shared/data "
        f"beside the checkout)",
    )
    p.add_argument(
        "--hub", action="store_true", help="use lm-eval's built-in tasks (Hub data) even if local data exists"
    )
    _flag(p, "--bootstrap-iters", type=int, default=100000, help="bootstrap iterations for stderrs (lm-eval's)")
    p.add_argument(
        "--output",
        "--output-path",
        "--output_path",
        "-o",
        dest="output",
        default=None,
        help="write the results JSON here (a .json file, or a folder for FOLDER/results.json)",
    )
    _flag(p, "--log-samples", action="store_true", help="also write per-document records (needs --output)")


def resolve_tasks(names: list[str], data_dir, hub: bool, include_path):
    """-> (specs for lm-eval, TaskManager, which are local). Builds lm-eval's full task index only when a task is not
    local; an unknown name is a NeoXError listing the close matches."""
    from lm_eval.tasks import TaskManager

    from neox_jax.evaluation.tasks import LOCAL_TASKS, task_specs

    specs = task_specs(names, data_dir, hub)
    local = [n for n in names if specs[n] != n]

    def unresolved(n, tm) -> bool:  # not local, not in tm's index, not a task YAML by path (lm-eval expands ~)
        return specs[n] == n and n not in tm.all_tasks and not Path(n).expanduser().is_file()

    tm = TaskManager(include_path=include_path, include_defaults=False)
    if any(unresolved(n, tm) for n in names):
        tm = TaskManager(include_path=include_path)
    known = set(tm.all_tasks) | set(LOCAL_TASKS)
    unknown = [n for n in names if unresolved(n, tm)]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=5, cutoff=0.6)
            hints.append(f"{n!r} (close: {', '.join(close)})" if close else repr(n))
        raise NeoXError(f"unknown task(s): {'; '.join(hints)}. `lm-eval ls tasks` lists them all.")
    return specs, tm, local


def reference_table(results: dict) -> str:
    """Task | Metric | Value ± Stderr, one row per metric (the layout of the reference's README)."""
    lines = ["| Task | Metric | Value |", "|---|---|---|"]
    for task, res in results["results"].items():
        first = True
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = res.get(f"{metric}_stderr,{filt}")
            cell = f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")
            lines.append(f"| {task if first else ''} | {metric} | {cell} |")
            first = False
    return "\n".join(lines)


def _output_file(output: str) -> Path:
    out = Path(output)
    return out if out.suffix == ".json" else out / "results.json"


def run(a: argparse.Namespace) -> int:
    from neox_jax.evaluation.tasks import check_data_dir, check_offline, data, offline_var
    from neox_jax.store import checkpoint, records

    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not names:
        raise NeoXError("--tasks is empty")
    if a.log_samples and not a.output:
        raise NeoXError("--log_samples needs --output (a file or folder to write the samples beside)")
    # every input and the output place are checked before any work: the evaluation may take hours
    checkpoint.read_metadata(a.checkpoint)
    check_data_dir(a.data_dir)
    out = records.check_writable(_output_file(a.output), "--output") if a.output else None
    if a.data_dir:
        os.environ[data.ENV_VAR] = a.data_dir  # the task loaders read it
    # lm-eval's bootstrap forks a process pool, and forking a (multithreaded) JAX process can hang; without it the
    # same seeded resamples run in this process and give the same stderrs
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    specs, tm, local = resolve_tasks(names, a.data_dir, a.hub, a.include_path)
    check_offline(specs, a.data_dir, tm)  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: no retries, a clear error now
    for n in names:
        print(f"{n}: {'local data (' + str(data.find(n, a.data_dir)) + ')' if n in local else 'lm-eval built-in'}")

    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    from neox_jax.evaluation.harness import NeoXLM

    t0 = time.time()
    try:
        lm = NeoXLM(
            pretrained=a.checkpoint,
            dtype=a.dtype,
            batch_size=a.batch_size,
            mesh=a.mesh,
            finetuned=a.finetuned,
            adapter=a.adapter,
            quantize=a.quantize,
            max_length=a.max_length,
            tokenizer=a.tokenizer,
            logprob_vocab=a.logprob_vocab,
        )
    except ValueError as e:  # a bad batch size, a model that cannot split over the mesh, no tokenizer
        raise NeoXError(str(e)) from e
    print(f"loaded {lm.model} in {time.time() - t0:.1f}s")
    try:
        results = simple_evaluate(
            model=lm,
            tasks=[specs[n] for n in names],
            num_fewshot=a.num_fewshot,
            limit=a.limit,
            task_manager=tm,
            bootstrap_iters=a.bootstrap_iters,
            log_samples=a.log_samples,
        )
    except OSError as e:  # offline, the pre-check lets through what it cannot judge; datasets' own error, in one line
        if offline_var() is None:
            raise
        raise NeoXError(f"lm-eval could not load the task data with {offline_var()} set: {e}") from e
    samples = results.pop("samples", None) or {}
    results["config"]["neox_jax"] = {
        "checkpoint": str(a.checkpoint),
        "dtype": a.dtype,
        "mesh": a.mesh,
        "finetuned": a.finetuned,
        "adapter": a.adapter,
        "quantize": a.quantize,
        "batch_size": lm.batch_rows,
        "local_tasks": {n: str(data.find(n, a.data_dir)) for n in local},
    }
    print(make_table(results))
    print(reference_table(results))
    print(f"evaluated in {time.time() - t0:.1f}s")
    if out is not None:
        records.write_text(out, json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {out}")
        for task, rows in samples.items():
            f = out.with_name(f"samples_{task}.jsonl")
            records.write_text(f, "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows))
            print(f"samples written to {f}")
    return 0
