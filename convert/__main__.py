"""python -m convert {hf,neox,to-hf,quantize,merge} ...: one-time checkpoint conversion."""
from __future__ import annotations

import argparse
import sys

from neox_jax.errors import NeoXError

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


def _hf(a):
    from convert.hf import convert_hf
    return convert_hf(a.src, a.out, a.dtype, allow_nonfinite=a.allow_nonfinite, progress=not a.quiet)


def _to_hf(a):
    from convert.hf import export_hf
    return export_hf(a.ckpt, a.out, a.dtype, progress=not a.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("hf", help="Hugging Face GPTNeoXForCausalLM directory -> neox-jax checkpoint",
                       description="Convert a save_pretrained directory of GPTNeoXForCausalLM (safetensors, sharded "
                                   "safetensors, or pytorch_model*.bin; config.json of transformers 4 or 5) into a "
                                   "neox-jax checkpoint, one tensor at a time.")
    h.add_argument("src", help="directory with config.json and the weights (e.g. a downloaded EleutherAI/pythia-1b)")
    h.add_argument("out", help="output checkpoint directory (must not exist; appears only when complete)")
    h.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="stored parameter dtype (default float32)")
    h.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf weights instead of refusing them")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    h.set_defaults(run=_hf)

    t = sub.add_parser("to-hf", help="neox-jax checkpoint -> Hugging Face directory (sharded safetensors)",
                       description="Write a neox-jax checkpoint as a Hugging Face GPTNeoXForCausalLM directory that "
                                   "transformers.AutoModelForCausalLM.from_pretrained loads.")
    t.add_argument("ckpt", help="neox-jax checkpoint directory")
    t.add_argument("out", help="output directory (must not exist)")
    t.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="dtype of the written weights (default: as stored)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=_to_hf)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


_EXTRA_COMMANDS: list = []  # later converters (neox slim shards, quantize, merge) append a parser-registering function


def _register_optional():
    import importlib

    for mod in ("convert.neox", "convert.quantize", "convert.merge", "convert.verify"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        if m.register not in _EXTRA_COMMANDS:  # main() may run more than once in a process (tests)
            _EXTRA_COMMANDS.append(m.register)


def main(argv=None) -> int:
    _register_optional()
    args = build_parser().parse_args(argv)
    try:
        summary = args.run(args)
    except NeoXError as e:  # ConvertError, CheckpointError, disk full, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    if summary:
        gb = summary.get("bytes", 0) / 1e9
        print(f"wrote {summary['out']}: {summary.get('params', 0):,} parameters, {gb:.3f} GB "
              f"({summary.get('dtype', '')}) in {summary.get('seconds', 0):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
