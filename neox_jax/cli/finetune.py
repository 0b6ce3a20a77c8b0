"""Fine-tune a neox-jax checkpoint: the biases (BitFit, as the GPT-NeoX-20B reference did), every parameter, or LoRA
adapters (interchangeable with PEFT), on a device mesh, in mixed precision, resumable.

    neox-jax finetune --checkpoint ckpt/pythia-160m --data input.txt --out runs/shakespeare \\
        --steps 1000 --batch-size 8 --seq-len 128 --dtype bf16 --eval-every 100
    neox-jax finetune ... --resume            # after an interruption (SIGTERM / Ctrl-C saves first)
    neox-jax finetune --checkpoint ckpt/pythia-160m-step1000 --data pile/document --start-step 1000 \\
        --seq-len 2048 --batch-size 1024 --trainable all --out runs/continue   # Pythia's own batches from step 1000
    neox_jax.load("ckpt/pythia-160m", finetuned="runs/shakespeare")   # in Python: base + trained biases
    neox-jax convert merge ckpt/pythia-160m runs/shakespeare ckpt/pythia-160m-shakespeare
    neox-jax finetune ... --remat full --mesh fsdp=8    # 20B: activation checkpointing, FSDP (docs/finetuning.md)
    neox-jax finetune ... --trainable lora --lora-rank 8 --lora-alpha 16 --out runs/lora   # LoRA (docs/lora.md)
    neox-jax convert to-peft ckpt/pythia-160m runs/lora adapters/lora   # for peft.PeftModel.from_pretrained
"""

from __future__ import annotations

import argparse

from neox_jax.errors import NeoXError

HELP = "fine-tune a checkpoint (BitFit, full or LoRA) on text / jsonl files, on a device mesh, resumable"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from neox_jax.store.checkpoint import DTYPE_CHOICES
    from neox_jax.training.run import RunConfig

    d = RunConfig("", [], "")
    p.add_argument("--checkpoint", required=True, help="neox-jax checkpoint directory (neox-jax convert ...)")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="FILE",
        help='plain text files (one document each) and/or .jsonl files (one {"text": ...} per line); or one '
        "Megatron dataset PREFIX (PREFIX.idx + .bin, e.g. Pythia's preshuffled Pile: trained in its order)",
    )
    p.add_argument(
        "--start-step",
        type=int,
        metavar="N",
        help="--data PREFIX: start at step N of the dataset's order (Pythia's revision stepN has trained on steps "
        "0 .. N-1); step j of this run then trains on sequences [N * 1024 + j * B, ... + B), B = --batch-size",
    )
    p.add_argument(
        "--data-step-items",
        type=int,
        default=d.data_step_items,
        metavar="K",
        help="--data PREFIX: sequences a step of the dataset's order (default %(default)s, Pythia's)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="RUN_DIR",
        help="run directory: checkpoints, finetuned params, metrics.jsonl, loss.png",
    )
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: the checkpoint's)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per training window (default %(default)s)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="global batch size, split over the mesh's data axis (default %(default)s)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="number of optimizer steps")
    length.add_argument("--epochs", type=float, help="number of passes over the training windows (default 1)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (default 0)")
    p.add_argument(
        "--schedule",
        choices=("cosine", "linear", "constant"),
        default=d.schedule,
        help="decay after warm-up (default %(default)s)",
    )
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=d.min_lr_ratio,
        help="final lr as a fraction of --lr for cosine / linear (default %(default)s)",
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    p.add_argument(
        "--grad-clip",
        type=float,
        default=d.grad_clip,
        help="clip gradients to this global norm; 0 turns clipping off (default %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="dtype of the frozen weights and the forward pass (default: as stored); trainable params keep "
        "float32 master copies; float16 uses dynamic loss scaling",
    )
    p.add_argument(
        "--mesh",
        default=d.mesh,
        help="device mesh, e.g. 'data=2,model=4' (batch over data, weights "
        "over model); -1 = the remaining devices (default %(default)s)",
    )
    p.add_argument(
        "--trainable",
        choices=("biases", "all", "lora"),
        default=d.trainable,
        help="biases: of query_key_value, attention.dense and dense_h_to_4h (BitFit); all: everything; "
        "lora: new low-rank adapters on the block linears, the base frozen (docs/lora.md)",
    )
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank r (default %(default)s)")
    p.add_argument(
        "--lora-alpha",
        type=float,
        default=d.lora_alpha,
        help="LoRA alpha: the update is scaled by alpha / r (default %(default)s)",
    )
    p.add_argument(
        "--lora-targets",
        default=d.lora_targets,
        metavar="NAMES",
        help="comma-separated linears to adapt, of query_key_value, dense, dense_h_to_4h, dense_4h_to_h "
        "(default %(default)s, as PEFT's for GPT-NeoX)",
    )
    p.add_argument(
        "--lora-dropout",
        type=float,
        default=d.lora_dropout,
        help="dropout on the adapters' input while training (default %(default)s)",
    )
    p.add_argument("--rslora", action="store_true", help="rank-stabilised LoRA: scale alpha / sqrt(r)")
    p.add_argument(
        "--save-every", type=int, default=d.save_every, help="checkpoint every N steps (default %(default)s)"
    )
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep (default %(default)s)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="held-out loss every N steps and at the end; 0 = no held-out split (default)",
    )
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=d.eval_fraction,
        help="fraction of windows held out when --eval-every is set (default %(default)s)",
    )
    p.add_argument(
        "--eval-batches",
        type=int,
        default=d.eval_batches,
        help="at most this many held-out batches per evaluation; 0 = all (default)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="data order and RNG seed (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument(
        "--allow-schedule-change",
        action="store_true",
        help="on --resume, accept a --steps / --epochs that changes the run's total step count (and so "
        "reshapes its learning-rate schedule); refused otherwise",
    )
    p.add_argument(
        "--initial-loss-scale",
        type=float,
        default=d.initial_loss_scale,
        help="float16 only: starting loss scale (default 2^15)",
    )
    p.add_argument(
        "--loss-scale-period",
        type=int,
        default=d.loss_scale_period,
        help="float16 only: double the loss scale after this many finite steps (default %(default)s)",
    )
    p.add_argument(
        "--no-transposed-copies",
        dest="transposed_copies",
        action="store_false",
        help="bfloat16 on CPU: do not keep a transposed copy of the frozen weights for the backward "
        "pass; saves one copy of the frozen weights, but the backward matmuls then run in float32 "
        "(pythia-160m BitFit: ~1.6x slower steps)",
    )
    p.add_argument(
        "--remat",
        choices=("none", "dots", "full"),
        default=d.remat,
        help="activation checkpointing per block: none keeps every activation for the backward pass; dots keeps "
        "each linear layer's output and recomputes the rest (attention scores included); full keeps only each "
        "block's input and recomputes the block (least memory, ~1/3 more compute). With dots / full the layers "
        "run stacked under lax.scan (default %(default)s; docs/finetuning.md)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # test hook: SIGTERM after this step


def run(args: argparse.Namespace) -> int:
    from neox_jax.store.checkpoint import dtype_name
    from neox_jax.training.run import NonFiniteLoss, RunConfig
    from neox_jax.training.run import run as train

    kw = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "debug")}
    if kw["dtype"] is not None:
        kw["dtype"] = dtype_name(kw["dtype"])
    try:
        return train(RunConfig(**kw))
    except NeoXError:
        raise
    except (NonFiniteLoss, ValueError, FileNotFoundError) as e:  # a diverged run, a bad flag value, a missing file
        raise NeoXError(str(e)) from e
