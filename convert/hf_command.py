"""`neox-jax convert hf` and `convert to-hf`: the argument parsers over hub.py (a local directory or a hub id, which
is resolved and verified first) and hf.py (the conversion both ways). Apart from hf.py so that hf.py and hub.py do
not import each other."""

from __future__ import annotations

from neox_jax.store.checkpoint import DTYPE_CHOICES

from .hf import export_hf
from .hub import convert_source


def _run_hf(a):
    return convert_source(a.src, a.out, a.revision, a.dtype, allow_nonfinite=a.allow_nonfinite, progress=not a.quiet)


def _run_to_hf(a):
    return export_hf(a.ckpt, a.out, a.dtype, progress=not a.quiet)


def register(subparsers) -> None:
    h = subparsers.add_parser(
        "hf",
        help="Hugging Face GPTNeoXForCausalLM directory -> neox-jax checkpoint",
        description="Convert a save_pretrained directory of GPTNeoXForCausalLM (safetensors, "
        "sharded safetensors, or pytorch_model*.bin; config.json of transformers 4 "
        "or 5) into a neox-jax checkpoint, one tensor at a time. SRC may be a hub "
        "id (org/name, with --revision): only the files conversion needs are "
        "downloaded, each verified against the Hub's sha256, and the commit is "
        "recorded in metadata.json (see docs/hub.md).",
    )
    h.add_argument(
        "src",
        help="directory with config.json and the weights, or a hub id such as EleutherAI/pythia-1b "
        "(downloaded with huggingface_hub, each file checked against the Hub's sha256)",
    )
    h.add_argument(
        "--revision",
        default=None,
        help="with a hub id: branch, tag or commit (Pythia: step0, step1, step2, step4 ... step143000; default main)",
    )
    h.add_argument("out", help="output checkpoint directory (must not exist; appears only when complete)")
    h.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="stored parameter dtype (default float32)")
    h.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf weights instead of refusing them")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    h.set_defaults(convert=_run_hf)

    t = subparsers.add_parser(
        "to-hf",
        help="neox-jax checkpoint -> Hugging Face directory (sharded safetensors)",
        description="Write a neox-jax checkpoint as a Hugging Face GPTNeoXForCausalLM directory "
        "that transformers.AutoModelForCausalLM.from_pretrained loads.",
    )
    t.add_argument("ckpt", help="neox-jax checkpoint directory")
    t.add_argument("out", help="output directory (must not exist)")
    t.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default=None, help="dtype of the written weights (default: as stored)"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(convert=_run_to_hf)
