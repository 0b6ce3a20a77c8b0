"""JAX's persistent compilation cache, on by default for the scripts, so a second run skips XLA compiles.

    from neox_jax.store import compile_cache
    compile_cache.enable()           # the default directory, unless NEOX_JAX_COMPILE_CACHE=0
    compile_cache.enable(path)       # a directory of your own; enable(False) / NEOX_JAX_COMPILE_CACHE=0: off

The directory: NEOX_JAX_COMPILE_CACHE if set (a path), else $XDG_CACHE_HOME/neox-jax/xla (default ~/.cache/...).
The library itself never turns it on: it changes a process-wide JAX setting, which is the script's call to make.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "NEOX_JAX_COMPILE_CACHE"
OFF = ("0", "off", "false", "no", "")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neox-jax" / "xla"


def enable(path: str | os.PathLike | bool | None = None) -> Path | None:
    """Turns the cache on (returns its directory) or, for path=False or NEOX_JAX_COMPILE_CACHE=0, leaves it off
    (returns None)."""
    if path is False:
        return None
    if path is None or path is True:
        env = os.environ.get(ENV)
        if env is not None and env.strip().lower() in OFF:
            return None
        path = env or default_dir()
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # small programs too: they add up
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def add_argument(parser) -> None:
    """--no-compile-cache / --compile-cache DIR for a script's argparse parser; then call enable(args.compile_cache)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help=f"JAX persistent compilation cache directory (default: ${ENV} or {default_dir()})",
    )
    group.add_argument(
        "--no-compile-cache",
        dest="compile_cache",
        action="store_false",
        help=f"do not use the persistent compilation cache (also: {ENV}=0)",
    )
