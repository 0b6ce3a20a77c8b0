"""Resumable results: a JSON-lines file appended to (and fsynced) as work finishes, and the settings file that says
which run it belongs to.

A run killed mid-write leaves at most a torn last line: `read_rows` drops it and cuts it from the file, so the next
append starts on a fresh line and only the work whose rows are missing is done again. Whole files (settings, reports)
are written to a temporary name and renamed, so an interrupted run leaves the last good one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from neox_jax.errors import NeoXError


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows so far ([] when the file is absent). A torn last line is dropped and cut from the file; a bad line
    elsewhere is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise NeoXError(f"{path}: line {i + 1} is not JSON ({e}); fix or remove it") from None
            write_atomic(path, "".join(ln + "\n" for ln in lines[:i] if ln.strip()))  # the torn tail, cut
    return rows


def append_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Appends rows in one write and fsyncs, so a finished batch of work is on disk before the next begins."""
    if not rows:
        return
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def check_settings(path: str | os.PathLike, identity: dict) -> None:
    """First run into a folder: writes `identity` (what makes two runs' rows comparable) to path. Later runs: fails,
    naming each difference, when the settings now differ from those there."""
    path = Path(path)
    if path.is_file():
        old = json.loads(path.read_text())
        differ = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        if differ:
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            raise NeoXError(f"{path}: {path.parent} holds a run with other settings ({what}); use another --output")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(identity, indent=1) + "\n")
