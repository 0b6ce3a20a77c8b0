"""Resumable runs: a JSON-lines results file appended to (and fsynced) as work finishes, the settings file that
says which run it belongs to, and the per-item loop of the checkpoint studies (memorization, data loss).

A run killed mid-write leaves at most a torn last line: `read_rows` drops it and cuts it from the file, so the next
append starts on a fresh line and only the work whose rows are missing is done again. Whole files (settings, reports)
are written to a temporary name and renamed, so an interrupted run leaves the last good one.

    out = run_study(study, revisions, dataset, range(0, 4096), length=64, batch=64, results=OUT / "results.jsonl")

For each revision (the next one loading meanwhile, neox_jax/sweep/prefetch.py) the items missing from the results
file are scored `batch` at a time, and each batch's rows {revision, step, item, <study.key>, ...} are appended and
fsynced before the next batch begins: a rerun scores only the (revision, item) pairs not there yet. The last batch of
a revision is filled up to `batch` rows with copies of its last item (their values dropped), so every batch has one
shape and the programs compile once for the whole run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from neox_jax.errors import NeoXError
from neox_jax.sweep.prefetch import Revisions


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


def check_settings(path: str | os.PathLike, identity: dict, what: str = "run") -> None:
    """First run into a folder: writes `identity` (what makes two runs' rows comparable) to path. Later runs: fails,
    naming each difference, when the settings now differ from those there. what: the kind of run, for the message."""
    path = Path(path)
    if path.is_file():
        old = json.loads(path.read_text())
        differ = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        if differ:
            diff = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
            raise NeoXError(f"{path}: {path.parent} holds a {what} with other settings ({diff}); use another --output")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(identity, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- per-item studies
class Study(Protocol):
    key: str  # the row field the study fills ("score", "loss")

    def start(self, model) -> None: ...  # a revision's neox_jax.NeoX: point the compiled programs at its params

    def values(self, sequences) -> list[float]: ...  # [batch, length] int (or a list of 1-d arrays) -> one per row

    def stop(self) -> None: ...  # drop the revision's params


def parse_items(spec: str, n_items: int | None = None) -> range:
    """ "A:B" -> range(A, B) (B excluded), checked against the dataset's size when given."""
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise NeoXError(f"--items {spec!r}: expected START:STOP integers (STOP excluded), e.g. 0:4096") from None
    if not 0 <= a < b:
        raise NeoXError(f"--items {spec!r}: need 0 <= START < STOP")
    if n_items is not None and b > n_items:
        raise NeoXError(f"--items {spec!r}: the dataset has {n_items} items (0:{n_items})")
    return range(a, b)


def gather(dataset, items: Sequence[int], length: int | None) -> np.ndarray | list[np.ndarray]:
    """The first `length` tokens of each item -> [len(items), length] int32 (an item shorter than that is an error
    naming it); length None: each item whole, a list of 1-d int arrays."""
    seqs = [np.asarray(dataset[i]) for i in items]
    for i, seq in zip(items, seqs):
        if seq.ndim != 1 or len(seq) < (length or 1):
            raise NeoXError(f"item {i}: {seq.shape} tokens, expected at least {length or 1} (a 1-d sequence)")
    if length is None:
        return seqs
    return np.stack([s[:length] for s in seqs]).astype(np.int32)


def missing(rows: list[dict], revisions: Sequence[str], items: Sequence[int]) -> dict[str, list[int]]:
    """revision -> the items it has no row for yet (revisions with none missing left out)."""
    done = {(r["revision"], r["item"]) for r in rows}
    todo = {rev: [i for i in items if (rev, i) not in done] for rev in revisions}
    return {rev: its for rev, its in todo.items() if its}


def latest(rows: list[dict], revisions: Sequence[str], items: Sequence[int]) -> list[dict]:
    """The rows for these revisions and items, one per pair (the last written wins), in revision then item order."""
    want_rev, want_item = {r: k for k, r in enumerate(revisions)}, set(items)
    by_pair = {(r["revision"], r["item"]): r for r in rows if r["revision"] in want_rev and r["item"] in want_item}
    return [by_pair[k] for k in sorted(by_pair, key=lambda k: (want_rev[k[0]], k[1]))]


def run_study(
    study: Study,
    revs: Revisions,
    dataset,
    items: Sequence[int],
    length: int | None,
    batch: int,
    results: Path,
    extra=None,
    log=print,
) -> dict:
    """Scores what is missing; returns {"rows": the rows for these revisions x items, "scored": pairs scored now,
    "skipped": pairs already there, "duplicates": {revision: earlier revision with the same weights}}.
    length: tokens of each item the study reads (None: all of each); extra(item) -> more row fields (the data step)."""
    if batch < 1:
        raise NeoXError(f"--batch {batch}: must be >= 1")
    rows = read_rows(results)
    todo = missing(rows, revs.names, items)
    total = len(revs.names) * len(items)
    n_todo = sum(map(len, todo.values()))
    log(f"{len(revs.names)} revisions x {len(items)} items: {total - n_todo} already in {results}, {n_todo} to do")
    duplicates, scored = {}, 0
    bar = tqdm(total=n_todo, desc=study.key, unit="seq", disable=n_todo == 0)
    try:
        for cur in revs.prepared([r for r in revs.names if r in todo]):
            if cur.duplicate_of:
                duplicates[cur.revision] = cur.duplicate_of
                log(f"{cur.revision}: weights identical to {cur.duplicate_of} (fingerprint {cur.fingerprint[:12]})")
            t0, its = time.perf_counter(), todo[cur.revision]
            study.start(cur.model)
            for s in range(0, len(its), batch):
                chunk = its[s : s + batch]
                seqs = gather(dataset, chunk + [chunk[-1]] * (batch - len(chunk)), length)  # one shape throughout
                vals = study.values(seqs)[: len(chunk)]
                new = [
                    {"revision": cur.revision, "step": revs.step(cur.revision), "item": int(i), study.key: v}
                    | (extra(i) if extra else {})
                    for i, v in zip(chunk, vals)
                ]
                append_rows(results, new)
                rows += new
                scored += len(new)
                bar.update(len(new))
            study.stop()
            dt = time.perf_counter() - t0
            log(f"{cur.revision}: {len(its)} items in {dt:.1f} s ({len(its) / max(dt, 1e-9):.1f} seq/s)")
    finally:
        bar.close()
    for r in revs.names:  # revisions finished before, in an earlier run
        dup = revs.dup_of.get(r)
        if dup:
            duplicates.setdefault(r, dup)
    rows = latest(rows, revs.names, items)
    return {"rows": rows, "scored": scored, "skipped": total - n_todo, "duplicates": duplicates}


def by_revision(rows: list[dict], revisions: Sequence[str]) -> dict[str, list[dict]]:
    out = {r: [] for r in revisions}
    for row in rows:
        out[row["revision"]].append(row)
    return out
