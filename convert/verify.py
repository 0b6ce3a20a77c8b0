"""neox-jax convert verify CKPT: re-hash every file of a neox-jax checkpoint against the sha256 recorded in its
metadata.json when it was written. Prints "ok" and the bytes checked, or names each group that differs (exit 1)."""

from __future__ import annotations

import time

from neox_jax.store.checkpoint import verify


def _run(a):
    t0 = time.time()
    n = verify(a.ckpt)
    print(f"ok: {a.ckpt}: {n:,} bytes checked, every file matches its recorded sha256 ({time.time() - t0:.1f} s)")


def register(subparsers) -> None:
    v = subparsers.add_parser(
        "verify", help="re-hash a checkpoint's files against their recorded sha256", description=__doc__
    )
    v.add_argument("ckpt", help="neox-jax checkpoint directory")
    v.set_defaults(convert=_run)
