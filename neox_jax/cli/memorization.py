"""Memorization of training sequences across checkpoints (the Pythia papers' study), in one process.

For each item of a Megatron dataset (PREFIX.bin / PREFIX.idx; for Pythia, one 2049-token training sequence per
item) the first --context tokens are the prompt, greedy decoding makes --continuation tokens, and the score is the
fraction of them equal to the true next tokens (1.0: memorized). As EleutherAI's eval_memorization.py does (through
transformers' min_length), the end-of-text id is never generated; --allow-eos for plain greedy.

Writes OUT/results.jsonl (one row {revision, step, item, score} per item, appended per batch: rerunning the same
command does only what is missing), OUT/summary.md and summary.json (memorized count and fraction per revision),
OUT/memorization.png (against training step) and OUT/memorized-evals/REVISION.csv (columns index, score, as
EleutherAI's script writes them). The next revision downloads while this one runs.

examples:
  neox-jax memorization --model EleutherAI/pythia-70m-deduped --pythia-steps log \\
      --data pile/pile_0.87_deduped_text_document --items 0:65536 --output mem/70m
  neox-jax memorization --model EleutherAI/pythia-1b --revisions step71000,step143000 --data pile/document \\
      --items 0:1048576 --batch 512 --dtype float16 --mesh data=8 --output mem/1b
  neox-jax memorization --model checkpoints/my-run --data my_data/text_document --items 0:1000 --output mem/local
"""

from __future__ import annotations

import argparse

HELP = "memorization scores (greedy k + n tokens) of training sequences across checkpoints: rows, summary, plots"


def add_checkpoint_arguments(
    p: argparse.ArgumentParser, batch: int = 64, batch_help: str = "sequences per compiled call", steps: bool = True
) -> None:
    """--model, the revision choice, --data, --output, --batch, --dtype, --mesh (shared with data-loss)."""
    p.add_argument("--model", required=True, help="hub id (e.g. EleutherAI/pythia-70m) or a local checkpoint dir")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--revisions", help="comma-separated hub revisions, e.g. step0,step1000,step143000")
    if steps:
        which.add_argument("--steps", help="START:STOP:STEP (STOP included) -> stepN revisions, e.g. 0:143000:10000")
    which.add_argument(
        "--pythia-steps", choices=("log", "all"), help="Pythia's published steps: log (20 revisions) or all 154"
    )
    p.add_argument("--data", required=True, help="dataset path prefix: PREFIX.bin and PREFIX.idx (Megatron format)")
    p.add_argument("--output", required=True, help="output folder (results.jsonl, summary.md, plots)")
    p.add_argument("--batch", type=int, default=batch, help=f"{batch_help} (default {batch})")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="dtype the checkpoints are converted to and run in (default float32)",
    )
    p.add_argument("--mesh", default=None, help='shard over devices, e.g. "data=8" or "data=2,model=4"')


def revisions_of(args: argparse.Namespace) -> list[str] | None:
    from neox_jax.sweep.run import revisions_from

    steps = getattr(args, "steps", None)  # data-loss has no revision --steps
    if args.revisions is None and steps is None and args.pythia_steps is None:
        return None  # a local checkpoint (a hub id without revisions is an error named later)
    return revisions_from(args.revisions, steps, args.pythia_steps)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--items", required=True, help="dataset items START:STOP (STOP excluded), e.g. 0:4096")
    p.add_argument("--context", type=int, default=32, help="prompt tokens k (default 32)")
    p.add_argument("--continuation", type=int, default=32, help="greedy tokens compared with the data (default 32)")
    p.add_argument("--allow-eos", action="store_true", help="let greedy decoding choose the end-of-text id")


def run(args: argparse.Namespace) -> int:
    from neox_jax.data import IndexedDataset
    from neox_jax.sweep.memorization import MemorizationConfig, run_memorization
    from neox_jax.sweep.resume import parse_items

    dataset = IndexedDataset(args.data)
    cfg = MemorizationConfig(
        model=args.model,
        revisions=revisions_of(args),
        data=args.data,
        items=parse_items(args.items, len(dataset)),
        output=args.output,
        context=args.context,
        continuation=args.continuation,
        batch=args.batch,
        dtype=args.dtype,
        mesh=args.mesh,
        allow_eos=args.allow_eos,
    )
    run_memorization(cfg, dataset)
    return 0
