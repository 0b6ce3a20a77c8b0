"""Benchmarks, each a script in a checkout's scripts/bench/: `neox-jax benchmark NAME [args]`, or `all`.

    neox-jax benchmark                          # lists them
    neox-jax benchmark generate --help          # a benchmark's own flags
    neox-jax benchmark all

Every benchmark runs the PyTorch / transformers reference and neox-jax side by side in one run on the same machine,
prints a Markdown table and writes JSON (bench_out/NAME.json by default). Nothing here is a test: tests never time.
The benchmarks live in the source checkout (git clone, then `pip install -e ".[all]"`), not in the wheel: they need
the references (torch, transformers, lm-eval's hf backend) and the checkout's layout, and measure the project rather
than serve its users.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from neox_jax.errors import NeoXError

HELP = "time neox-jax against the PyTorch reference (needs a source checkout: scripts/bench/)"


def bench_dir() -> Path:
    """scripts/bench beside the neox_jax package (a checkout or an editable install)."""
    return Path(__file__).resolve().parents[2] / "scripts" / "bench"


def available() -> list[str]:
    return sorted(p.stem for p in bench_dir().glob("*.py") if not p.stem.startswith("_"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a benchmark, or `all`; none: list them")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")


def run(args: argparse.Namespace) -> int:
    folder = bench_dir()
    if not folder.is_dir():
        raise NeoXError(
            f"no benchmarks here: {folder} is absent (they ship with the source, not the wheel: "
            f"git clone the project and run `neox-jax benchmark` from an editable install)"
        )
    names = available()
    if args.name is None:
        print("available:", ", ".join(names) or "(none)")
        return 0
    todo = names if args.name == "all" else [args.name]
    for n in todo:
        if n not in names:
            raise NeoXError(f"unknown benchmark {n!r}; available: {', '.join(names)}")
    root = str(folder.parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    argv = sys.argv
    try:
        for n in todo:
            sys.argv = [str(folder / f"{n}.py"), *args.args]  # each benchmark parses its own flags
            runpy.run_path(str(folder / f"{n}.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return 0
