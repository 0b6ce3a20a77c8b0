"""Small files the project writes: whole files replaced atomically, JSON-lines logs appended to, output paths checked.

- `write_text` / `write_json`: written to `X.tmp` and renamed over X, so a crash leaves the previous X; the `.tmp` is
  removed when the write fails (disk full becomes one NeoXError).
- `read_jsonl`: a log appended to line by line (metrics.jsonl) can end in a torn line when the process was killed
  mid-write; that last line is dropped with a warning. A bad line before the end is an error naming file and line.
- `check_writable`: an output file path is checked (not a directory, its folder creatable and writable) before the
  work that fills it, with a probe file that is removed at once.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from neox_jax.errors import NeoXError


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise NeoXError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, payload) -> Path:
    return write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def check_writable(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Raises NeoXError naming `flag` unless a file can be written at path (its folder is created if needed)."""
    path = Path(path)
    if path.is_dir():
        raise NeoXError(f"{flag} {path}: is a directory; expected a file path (e.g. {path / 'results.json'})")
    probe = path.with_name(f".{path.name}.probe-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.open("x").close()
    except OSError as e:
        raise NeoXError(f"{flag} {path}: cannot write there ({e.strerror or e}: {e.filename or path.parent})") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return path


def read_jsonl(path: str | os.PathLike, warn=None) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per non-blank line; a torn (unparsable) last line is dropped with
    a warning, any other bad line raises NeoXError."""
    path = Path(path)
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    lines = path.read_text(errors="replace").split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if any(rest.strip() for rest in lines[n:]):
                raise NeoXError(f"{path}:{n}: not valid JSON ({e}); only a torn last line is dropped") from None
            warn(f"{path}:{n}: dropped a torn last line {line[:60]!r} (the process writing it was stopped mid-line)")
    return rows
