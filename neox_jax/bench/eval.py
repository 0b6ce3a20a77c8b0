"""lm-eval requests/s: neox-jax vs lm-eval's own `hf` backend, same random model, same tasks, same process.

    neox-jax benchmark eval            # pythia-160m shape, float32, CPU
    neox-jax benchmark eval --quick    # a tiny model, 4 documents per task: checks that it runs

A random GPTNeoXForCausalLM of the chosen shape is saved with the 20B tokenizer and converted with the real
converter; each backend then runs every task through lm-eval's simple_evaluate (local data, ../shared/data or
$NEOX_JAX_DATA_DIR), twice. Timed: the seconds spent inside the model's request methods (loglikelihood,
loglikelihood_rolling, generate_until), so lm-eval's own bookkeeping, identical for both, is left out; the first pass
includes neox-jax's compiles, the second is steady state. The metrics of both backends are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from neox_jax.bench._common import markdown_table, peak_rss_mb, require, write_json
from neox_jax.store import converters

LIMITS = {"lambada_openai": 200, "piqa": 100, "hellaswag": 50, "tinyshakespeare": 8}
REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def make_hf_dir(out: Path, shape: str, tokenizer: Path) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neox_jax.model.config import preset

    cfg = preset("pythia-160m")
    if shape == "tiny":
        cfg = cfg.replace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    torch.manual_seed(0)
    hf_cfg = {k: v for k, v in cfg.to_hf_config().items() if k not in ("dtype", "torch_dtype")}
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**hf_cfg)).eval()
    model.save_pretrained(out)
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    tokenizer_config = converters.module("hf").tokenizer_config

    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(cfg.max_position_embeddings)))
    return out


def timed(lm) -> dict:
    """Wraps the request methods of one LM instance to add up their seconds and requests."""
    stats = {"seconds": 0.0, "requests": 0}
    for name in REQUEST_METHODS:
        fn = getattr(lm, name)

        def wrapper(requests, *args, _fn=fn, **kwargs):
            t = time.perf_counter()
            out = _fn(requests, *args, **kwargs)
            stats["seconds"] += time.perf_counter() - t
            stats["requests"] += len(requests)
            return out

        setattr(lm, name, wrapper)
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 4 documents per task")
    p.add_argument("--tasks", default=",".join(LIMITS), help=f"comma-separated (default {','.join(LIMITS)})")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: per task, see LIMITS)")
    p.add_argument("--batch-size", type=int, default=8, help="both backends' batch_size (default 8)")
    p.add_argument("--passes", type=int, default=2, help="evaluation passes per backend (default 2)")
    p.add_argument("--out-dir", default="bench_out")
    a = p.parse_args()
    require(["torch", "transformers", "lm_eval"], "the model is built in transformers, the reference is lm-eval's hf")
    os.environ.setdefault("DISABLE_MULTIPROC", "1")

    from neox_jax.evaluation.tasks import data, task_specs

    tok = next((d / "20B_tokenizer.json" for d in data.data_dirs() if (d / "20B_tokenizer.json").is_file()), None)
    names = [t for t in a.tasks.split(",") if t]
    specs = task_specs(names)
    if tok is None or any(specs[n] == n for n in names):
        sys.exit(
            f"needs the reference data (20B_tokenizer.json and the tasks' files) under ../shared/data or "
            f"${data.ENV_VAR}; found: {data.data_dirs()}"
        )
    limits = {n: 4 if a.quick else (a.limit or LIMITS.get(n, 50)) for n in names}
    passes = a.passes  # the first pass of neox-jax includes its compiles: the second shows steady state

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from neox_jax.evaluation.harness import NeoXLM

    convert_hf = converters.module("hf").convert_hf

    torch.set_num_threads(os.cpu_count())
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        shape = "tiny" if a.quick else "pythia-160m"
        hf_dir = make_hf_dir(tmp / "hf", shape, tok)
        convert_hf(hf_dir, tmp / "ckpt", "float32", progress=False)
        tm = TaskManager(include_defaults=False)
        lms = {
            "neox-jax": NeoXLM(pretrained=str(tmp / "ckpt"), batch_size=a.batch_size),
            "hf": HFLM(pretrained=str(hf_dir), device="cpu", batch_size=a.batch_size, dtype="float32"),
        }
        rows, metrics = [], {}
        for backend, lm in lms.items():
            stats = timed(lm)
            for n in range(passes):
                stats.update(seconds=0.0, requests=0)
                for task in names:
                    r = simple_evaluate(
                        model=lm,
                        tasks=[specs[task]],
                        limit=limits[task],
                        task_manager=tm,
                        bootstrap_iters=0,
                        log_samples=False,
                    )
                    metrics.setdefault(task, {})[backend] = {
                        k: v for k, v in r["results"][task].items() if "," in k and "stderr" not in k
                    }
                rows.append(
                    {
                        "backend": backend,
                        "pass": n + 1,
                        "requests": stats["requests"],
                        "seconds": stats["seconds"],
                        "requests/s": stats["requests"] / stats["seconds"],
                    }
                )
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = {(r["backend"], r["pass"]): r["requests/s"] for r in rows}
    for r in rows:
        r["speedup vs hf"] = r["requests/s"] / rate[("hf", r["pass"])]
    table = markdown_table(rows, ["backend", "pass", "requests", "seconds", "requests/s", "speedup vs hf"])
    print(
        f"\n{shape}, float32, CPU ({os.cpu_count()} cores), batch_size {a.batch_size}, "
        f"docs per task {limits}\n{table}\n"
    )
    for task, m in metrics.items():
        print(task, json.dumps(m))
    out = write_json(
        "eval",
        {
            "shape": shape,
            "dtype": "float32",
            "batch_size": a.batch_size,
            "limits": limits,
            "rows": rows,
            "metrics": metrics,
            "peak_rss_mb": peak_rss_mb(),
        },
        a.out_dir,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
