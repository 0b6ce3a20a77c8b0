"""Benchmarks, each a module of neox_jax.bench: `neox-jax benchmark NAME [args]`, or `all`.

    neox-jax benchmark                          # lists them
    neox-jax benchmark int8 --quick             # the quickest: a tiny model's int8 bytes and decode ms/token
    neox-jax benchmark generate --help          # a benchmark's own flags
    neox-jax benchmark all

Every benchmark runs neox-jax and the PyTorch / transformers reference side by side in one run on the same machine,
prints a Markdown table and writes JSON (bench_out/NAME.json by default). Without torch / transformers installed
(pip install 'neox-jax[test]') a benchmark runs the neox-jax side alone and says in one line that the reference was
skipped; those whose model is itself built in transformers (eval, interp, serve, sweep, convert, kernels) say what they
need. Nothing here is a test: tests never time.
"""

from __future__ import annotations

import argparse
import pkgutil
import runpy
import sys

from neox_jax.errors import NeoXError

HELP = "time neox-jax against the PyTorch reference, side by side (neox_jax/bench/; `all` runs every one)"
PACKAGE = "neox_jax.bench"


def available() -> list[str]:
    """The benchmark modules shipped in neox_jax.bench (a checkout and a wheel alike)."""
    import neox_jax.bench

    return sorted(m.name for m in pkgutil.iter_modules(neox_jax.bench.__path__) if not m.name.startswith("_"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help=f"a benchmark ({', '.join(available())}), or `all`; none: list them")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (NAME --help lists its flags)")


def run(args: argparse.Namespace) -> int:
    names = available()
    if args.name is None:
        print("available:", ", ".join(names))
        return 0
    todo = names if args.name == "all" else [args.name]
    for n in todo:
        if n not in names:
            raise NeoXError(f"unknown benchmark {n!r}; available: {', '.join(names)}")
    argv = sys.argv
    try:
        for n in todo:
            sys.argv = [f"neox-jax benchmark {n}", *args.args]  # each benchmark parses its own flags
            runpy.run_module(f"{PACKAGE}.{n}", run_name="__main__")
    finally:
        sys.argv = argv
    return 0
