"""sha256 of every file a checkpoint stores, recorded in its metadata.json under `checksums`:

    "checksums": {"algorithm": "sha256",
                  "files": {"params/layers.0/ocdbt.process_0/d/1f0c...": {"bytes": 81920, "sha256": "9a4e..."}, ...}}

Paths are relative to the checkpoint directory (metadata.json itself is not listed). A file belongs to a *group*: the
parameter group for files under params/NAME/, else the file's own name (tokenizer.json). Hashing reads every byte,
so `neox_jax.load` only checks that each recorded file exists with its recorded size; `verify` (and `load(...,
verify=True)`, `neox-jax convert verify`) re-hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ALGORITHM = "sha256"
SKIP = {"metadata.json", ".owner.json"}
BLOCK = 4 * 2**20


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def stored_files(root: Path, under: str = "") -> list[str]:
    """Relative paths of the files under root/under (all of root when under is empty), sorted."""
    base = root / under if under else root
    out = []
    for dirpath, _, files in os.walk(base):
        for f in files:
            rel = (Path(dirpath) / f).relative_to(root).as_posix()
            if rel not in SKIP:
                out.append(rel)
    return sorted(out)


def record(root: Path, under: str = "") -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} for the files under root/under."""
    return {
        rel: {"bytes": (root / rel).stat().st_size, "sha256": hash_file(root / rel)}
        for rel in stored_files(root, under)
    }


def section(files: dict[str, dict]) -> dict:
    return {"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}


def digest(checksums: dict) -> str:
    """One sha256 over the recorded files and their hashes: the identity of a checkpoint's stored bytes."""
    return hashlib.sha256(json.dumps(checksums["files"], sort_keys=True).encode()).hexdigest()


def group_of(rel: str) -> str:
    parts = rel.split("/")
    return parts[1] if parts[0] == "params" and len(parts) > 2 else parts[0]


def problems(root: Path, checksums: dict, rehash: bool) -> dict[str, list[str]]:
    """{group: [what differs]} comparing the files under root with the record: missing, unexpected, size, and (when
    rehash) content. Empty when everything matches."""
    if checksums.get("algorithm") != ALGORITHM:
        return {"metadata.json": [f"checksums algorithm {checksums.get('algorithm')!r}, expected {ALGORITHM!r}"]}
    found: dict[str, list[str]] = {}
    recorded = checksums["files"]
    for rel in stored_files(root, "params"):  # what Orbax would read; other extra files (a README) do no harm
        if rel not in recorded:
            found.setdefault(group_of(rel), []).append(f"{rel}: not recorded (unexpected file)")
    for rel, want in recorded.items():
        path = root / rel
        if not path.is_file():
            msg = f"{rel}: missing"
        elif path.stat().st_size != want["bytes"]:
            msg = f"{rel}: {path.stat().st_size} bytes, recorded {want['bytes']}"
        elif rehash and hash_file(path) != want["sha256"]:
            msg = f"{rel}: sha256 differs from the record"
        else:
            continue
        found.setdefault(group_of(rel), []).append(msg)
    return found


def total_bytes(checksums: dict) -> int:
    return sum(f["bytes"] for f in checksums["files"].values())
