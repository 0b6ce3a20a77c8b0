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
import importlib
import importlib.util
import sys
from pathlib import Path

from neox_jax.errors import NeoXError

HELP = (
    "convert checkpoints: hf, neox (slim shards), to-hf, merge (fine-tuned), quantize (int8), verify (sha256), "
    "to-peft (LoRA)"
)

# the converter modules of the `convert/` folder, each with register(subparsers); one per line, in --help order
CONVERTERS = (
    "hf",
    "neox",
    "merge",
    "quantize",
    "verify",
    "peft",
)
PACKAGE = "neox_jax_convert"  # the name `convert/` is installed under: a user's convert.py cannot shadow it


def converters():
    """The converter package under the name `neox_jax_convert`: in a checkout, the `convert/` folder beside this
    neox_jax/, loaded by its path (so a worktree or a second checkout runs its own converters, not those an editable
    install points at; never by `import convert`, which the cwd could shadow); else the installed package."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    folder = Path(__file__).resolve().parents[2] / "convert"
    if not (folder / "__init__.py").is_file() or not (folder / "neox_layout.py").is_file():
        try:
            return importlib.import_module(PACKAGE)
        except ModuleNotFoundError as e:
            if e.name != PACKAGE:
                raise
            raise NeoXError(
                f"the converters are not installed (no {PACKAGE} package, no {folder}); reinstall neox-jax"
            ) from None
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    converters()
    sub = parser.add_subparsers(dest="converter", required=True, metavar="CONVERTER")
    for name in CONVERTERS:
        importlib.import_module(f"{PACKAGE}.{name}").register(sub)


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
