"""Evaluate many training checkpoints (hub revisions) of one model on lm-eval tasks, in one process.

Each revision is fetched and verified (neox_jax.store.hub), converted once into $NEOX_JAX_CACHE, and evaluated with the
neox-jax lm-eval backend; one line per (revision, task) goes to OUT/results.jsonl, then OUT/<task>.png (metric against
training step) and OUT/summary.md are written. Rerunning the same command resumes: pairs already in results.jsonl are
not evaluated again. Revisions whose weights are bit-identical to another's are flagged.

examples:
  neox-jax sweep --model EleutherAI/pythia-160m --pythia-steps log --tasks lambada_openai --output sweeps/160m
  neox-jax sweep --model EleutherAI/pythia-70m --steps 0:143000:10000 --tasks lambada_openai,piqa --limit 500 \\
      --output sweeps/70m
  neox-jax sweep --model EleutherAI/pythia-410m-deduped --revisions step0,step512,step143000 --tasks piqa \\
      --dtype bfloat16 --output sweeps/410m
"""

from __future__ import annotations

import argparse

HELP = "evaluate many checkpoints (hub revisions) of a model on lm-eval tasks: results.jsonl, plots, summary"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from neox_jax.store.hub import pythia_model_ids

    p.add_argument(
        "--model", required=True, help=f"hub id, e.g. {', '.join(pythia_model_ids()[:3])}, ... (any GPT-NeoX repo)"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--revisions", help="comma-separated revisions, e.g. step0,step1000,step143000")
    which.add_argument("--steps", help="START:STOP:STEP (STOP included) -> stepN revisions, e.g. 0:143000:10000")
    which.add_argument(
        "--pythia-steps",
        choices=("log", "all"),
        help="Pythia's published steps: log (0, 1, 2, 4, ..., 512, 1000, 2000, 4000, ..., 128000, "
        "143000: 20 revisions) or all 154",
    )
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. lambada_openai,piqa")
    p.add_argument("--output", required=True, help="output folder (results.jsonl, <task>.png, summary.md)")
    p.add_argument(
        "--limit",
        type=float,
        default=None,
        help="only the first N documents of each task (< 1: a fraction); for quick looks, not scores",
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--include-path", default=None, help="a folder of extra lm-eval task YAMLs")
    p.add_argument("--data-dir", default=None, help="local task data folder(s) (default: $NEOX_JAX_DATA_DIR)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="dtype the checkpoints are converted to and evaluated in (default float32)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward call (default 8)")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="bootstrap iterations for stderrs (lm-eval's)")
    p.add_argument(
        "--skip-duplicates",
        action="store_true",
        help="do not evaluate a revision whose weights are identical to an earlier one (flagged anyway)",
    )


def run(args: argparse.Namespace) -> int:
    from neox_jax.errors import NeoXError
    from neox_jax.sweep.run import SweepConfig, revisions_from, run_sweep

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise NeoXError("--tasks is empty")
    cfg = SweepConfig(
        model=args.model,
        revisions=revisions_from(args.revisions, args.steps, args.pythia_steps),
        tasks=tasks,
        output=args.output,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        data_dir=args.data_dir,
        dtype=args.dtype,
        batch_size=args.batch_size,
        bootstrap_iters=args.bootstrap_iters,
        skip_duplicates=args.skip_duplicates,
    )
    run_sweep(cfg)
    return 0
