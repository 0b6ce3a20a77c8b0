"""Per-sequence loss of training batches across checkpoints: what each checkpoint makes of the data it saw at step t,
before and after seeing it.

Each item of a Megatron dataset (PREFIX.bin / PREFIX.idx) is scored whole: its mean next-token loss (nats) under
each revision. --steps S1,S2 takes the items of those training steps' batches (Pythia: 1024 sequences a step, in the
order of the pre-shuffled data: --step-batch); --items A:B takes items directly.

Writes OUT/results.jsonl (one row {revision, step, item, loss, data_step} per item, appended per batch: rerunning
the same command does only what is missing), OUT/summary.md and summary.json (mean loss per revision and data step)
and OUT/data-loss.png (one line per data step against the checkpoint's step). The next revision downloads while this
one runs.

examples:
  neox-jax data-loss --model EleutherAI/pythia-160m-deduped --pythia-steps log \\
      --data pile/pile_0.87_deduped_text_document --steps 1000,64000,128000 --output loss/160m
  neox-jax data-loss --model EleutherAI/pythia-70m --revisions step1000,step2000,step3000 --data pile/document \\
      --steps 2000 --batch 16 --output loss/70m-step2000
  neox-jax data-loss --model checkpoints/my-run --data my_data/text_document --items 0:256 --output loss/local
"""

from __future__ import annotations

import argparse

HELP = "per-sequence loss of training batches (by step or item range) across checkpoints: rows, summary, plots"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from neox_jax.cli.memorization import add_checkpoint_arguments

    # --steps names data steps here, so the revisions come from --revisions / --pythia-steps only
    add_checkpoint_arguments(p, batch=8, batch_help="rows per compiled call, a max-length sequence each", steps=False)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--steps", dest="data_steps", help="training steps whose batches to score, e.g. 1000,64000")
    what.add_argument("--items", help="dataset items START:STOP (STOP excluded), e.g. 0:1024")
    p.add_argument("--step-batch", type=int, default=1024, help="sequences per training step (Pythia: 1024)")


def run(args: argparse.Namespace) -> int:
    from neox_jax.cli.memorization import revisions_of
    from neox_jax.data import IndexedDataset, pythia_items
    from neox_jax.errors import NeoXError
    from neox_jax.sweep.data_loss import DataLossConfig, run_data_loss
    from neox_jax.sweep.resume import parse_items

    dataset = IndexedDataset(args.data)
    data_steps = None
    if args.data_steps is not None:
        try:
            steps = [int(s) for s in args.data_steps.split(",") if s.strip()]
        except ValueError:
            raise NeoXError(
                f"--steps {args.data_steps!r}: expected comma-separated integers, e.g. 1000,64000"
            ) from None
        if not steps or any(s < 0 for s in steps) or len(set(steps)) != len(steps):
            raise NeoXError(f"--steps {args.data_steps!r}: expected distinct integers >= 0")
        data_steps = {int(i): s for s in steps for i in pythia_items(s, args.step_batch)}
        items = list(data_steps)
        if max(items) >= len(dataset):
            raise NeoXError(
                f"--steps {args.data_steps}: step {max(steps)}'s batch ends at item {max(items)}, but {args.data} "
                f"has {len(dataset)} items"
            )
    else:
        items = parse_items(args.items, len(dataset))
    cfg = DataLossConfig(
        model=args.model,
        revisions=revisions_of(args),
        data=args.data,
        items=items,
        output=args.output,
        data_steps=data_steps,
        batch=args.batch,
        dtype=args.dtype,
        mesh=args.mesh,
    )
    run_data_loss(cfg, dataset)
    return 0
