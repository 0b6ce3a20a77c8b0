"""Benchmarks, each a script in scripts/bench/: `python scripts/benchmark.py NAME [args]`, or `all`.

Every benchmark runs the PyTorch / transformers reference and neox-jax side by side in one run on the same machine,
prints a Markdown table and writes JSON (bench_out/NAME.json by default). Nothing here is a test: tests never time.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent / "bench"
ROOT = BENCH_DIR.parents[1]


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def main() -> None:
    names = available()
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        print("available:", ", ".join(names) or "(none)")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    name, rest = sys.argv[1], sys.argv[2:]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    todo = names if name == "all" else [name]
    for n in todo:
        if n not in names:
            sys.exit(f"unknown benchmark {n!r}; available: {', '.join(names)}")
        sys.argv = [str(BENCH_DIR / f"{n}.py"), *rest]
        runpy.run_path(str(BENCH_DIR / f"{n}.py"), run_name="__main__")


if __name__ == "__main__":
    main()
