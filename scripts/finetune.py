"""Fine-tune a neox-jax checkpoint: the biases (BitFit, as the GPT-NeoX-20B reference did) or every parameter, on a
device mesh, in mixed precision, resumable.

    python scripts/finetune.py --checkpoint ckpt/pythia-160m --data input.txt --out runs/shakespeare \\
        --steps 1000 --batch-size 8 --seq-len 128 --dtype bfloat16 --eval-every 100
    python scripts/finetune.py ... --resume            # after an interruption (SIGTERM / Ctrl-C saves first)
    neox_jax.load("ckpt/pythia-160m", finetuned="runs/shakespeare")   # in Python: base + trained biases
    python -m convert merge ckpt/pythia-160m runs/shakespeare ckpt/pythia-160m-shakespeare
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing

from neox_jax.checkpoint import CheckpointError  # noqa: E402
from neox_jax.data import DataError  # noqa: E402
from neox_jax.train import NonFiniteLoss, RunConfig, run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig("", [], "")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="neox-jax checkpoint directory (python -m convert ...)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="plain text files (one document each) and/or .jsonl files (one {\"text\": ...} per line)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: checkpoints, finetuned params, "
                   "metrics.jsonl, loss.png")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: the checkpoint's)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training window (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch size, split over the mesh's data axis (default %(default)s)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="number of optimizer steps")
    length.add_argument("--epochs", type=float, help="number of passes over the training windows (default 1)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (default 0)")
    p.add_argument("--schedule", choices=("cosine", "linear", "constant"), default=d.schedule,
                   help="decay after warm-up (default %(default)s)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="final lr as a fraction of --lr for cosine / linear (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="clip gradients to this global norm; 0 turns clipping off (default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the frozen weights and the forward pass (default: as stored); trainable params keep "
                        "float32 master copies; float16 uses dynamic loss scaling")
    p.add_argument("--mesh", default=d.mesh, help="device mesh, e.g. 'data=2,model=4' (batch over data, weights "
                   "over model); -1 = the remaining devices (default %(default)s)")
    p.add_argument("--trainable", choices=("biases", "all"), default=d.trainable,
                   help="biases: of query_key_value, attention.dense and dense_h_to_4h (BitFit); all: everything")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help="checkpoint every N steps (default %(default)s)")
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="held-out loss every N steps and at the end; 0 = no held-out split (default)")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="fraction of windows held out when --eval-every is set (default %(default)s)")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="at most this many held-out batches per evaluation; 0 = all (default)")
    p.add_argument("--seed", type=int, default=d.seed, help="data order and RNG seed (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--initial-loss-scale", type=float, default=d.initial_loss_scale,
                   help="float16 only: starting loss scale (default 2^15)")
    p.add_argument("--loss-scale-period", type=int, default=d.loss_scale_period,
                   help="float16 only: double the loss scale after this many finite steps (default %(default)s)")
    p.add_argument("--no-transposed-copies", dest="transposed_copies", action="store_false",
                   help="bfloat16 on CPU: do not keep a transposed copy of the frozen weights for the backward "
                        "pass; saves one copy of the frozen weights, but the backward matmuls then run in float32 "
                        "(pythia-160m BitFit: ~1.6x slower steps)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # test hook: SIGTERM after this step
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        return run(RunConfig(**args))
    except (CheckpointError, DataError, NonFiniteLoss, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
