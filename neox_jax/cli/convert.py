"""One-time checkpoint conversion: Hugging Face or GPT-NeoX shards -> neox-jax, and back.

    neox-jax convert hf pythia-160m ckpt/pythia-160m                    # a `hf download` folder -> checkpoint
    neox-jax convert neox 20B_checkpoints ckpt/neox-20b --dtype float16  # GPT-NeoX slim shards (any TP degree)
    neox-jax convert to-hf ckpt/pythia-160m hf/pythia-160m              # back to transformers' format
    neox-jax convert merge ckpt/pythia-160m runs/shakespeare ckpt/pythia-160m-shakespeare
    neox-jax convert quantize ckpt/neox-20b ckpt/neox-20b-int8          # int8 weights
    neox-jax convert to-peft ckpt/pythia-160m runs/lora adapters/lora    # a LoRA run -> PEFT adapter directory
    neox-jax convert verify ckpt/neox-20b                               # re-hash every file against its sha256

Needs the `convert` extra (torch, safetensors): pip install "neox-jax[convert]".
"""

from __future__ import annotations

import argparse
import sys

from neox_jax.store import converters

HELP = (
    "convert checkpoints: hf, neox (slim shards), to-hf, merge (fine-tuned), quantize (int8), verify (sha256), "
    "to-peft (LoRA)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="converter", required=True, metavar="CONVERTER")
    for name in converters.COMMANDS:
        converters.module(name).register(sub)


def run(args: argparse.Namespace) -> int:
    try:
        summary = args.convert(args)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    if summary:
        gb = summary.get("bytes", 0) / 1e9
        print(
            f"wrote {summary['out']}: {summary.get('params', 0):,} parameters, {gb:.3f} GB "
            f"({summary.get('dtype', '')}) in {summary.get('seconds', 0):.1f} s"
        )
    return 0
