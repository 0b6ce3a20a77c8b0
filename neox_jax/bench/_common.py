"""Helpers shared by the benchmarks: peak RSS, medians, Markdown tables, JSON output, the PyTorch reference's
presence, and the environment of a measurement's subprocess."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from neox_jax.errors import NeoXError

# the folder holding the neox_jax package (a checkout's root, or site-packages): a subprocess's PYTHONPATH
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ("torch", "transformers")


def have(*modules: str) -> bool:
    """Whether every module is importable (found, not imported)."""
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                return False
        except ImportError:  # a finder that refuses it
            return False
    return True


def reference_skipped(what: str = "the PyTorch reference", modules=REFERENCE) -> bool:
    """True (after one line saying so) when `modules` are not importable: the benchmark then runs neox-jax alone."""
    missing = [m for m in modules if not have(m)]
    if missing:
        print(f"{what} skipped: {', '.join(missing)} not importable (pip install 'neox-jax[test]'); neox-jax only")
    return bool(missing)


def require(modules, why: str) -> None:
    """A NeoXError (one line) when a benchmark cannot run at all without `modules`."""
    missing = [m for m in modules if not have(m)]
    if missing:
        raise NeoXError(f"this benchmark needs {', '.join(missing)} ({why}): pip install 'neox-jax[test]'")


def child_env(**extra) -> dict:
    """The environment of a measurement subprocess: this neox_jax importable first, plus `extra`."""
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def module_cmd(name: str, *args) -> list[str]:
    """`python -m neox_jax.bench.NAME ARGS`: a benchmark's own worker, run as a module (a script run by path would
    put this folder, whose convert.py is named like the converters, first on sys.path)."""
    return [sys.executable, "-m", f"neox_jax.bench.{name}", *map(str, args)]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of fn, s: a floor takes the best a kernel did, not its typical time."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(name: str, payload, out_dir: str | os.PathLike = "bench_out") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def run_json(cmd: list[str], what: str, env: dict | None = None, cwd=None) -> dict:
    """Runs a measurement in its own process (so its peak RSS and cold start are its own) and returns the JSON object
    it prints on its last stdout line; exits with its stderr if it failed."""
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd)
    if r.returncode:
        sys.exit(f"{what} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
