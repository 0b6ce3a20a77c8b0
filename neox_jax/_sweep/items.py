"""Per-item studies over checkpoints (memorization, data loss): revisions x training sequences -> one row each.

    rows = run_study(study, revisions, dataset, range(0, 4096), batch=64, results=OUT / "results.jsonl", log=print)

For each revision (the next one loading meanwhile, neox_jax/sweep/prefetch.py) the items missing from the results
file are scored `batch` at a time, and each batch's rows {revision, step, item, <study.key>, ...} are appended and
fsynced before the next batch begins. Rerunning resumes: (revision, item) pairs already there are not scored again,
and a torn last line (a run killed mid-write) is cut first (neox_jax/sweep/resume.py). The last batch of a revision is
filled up to `batch` rows with copies of its last item (their values dropped), so every batch has one shape and the
programs compile once for the whole run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from neox_jax.errors import NeoXError
from neox_jax._sweep.prefetch import Revisions
from neox_jax._sweep.resume import append_rows, read_rows


class Study(Protocol):
    key: str  # the row field the study fills ("score", "loss")

    def start(self, model) -> None: ...  # a revision's neox_jax.NeoX: point the compiled programs at its params

    def values(self, sequences: np.ndarray) -> list[float]: ...  # [batch, length] int -> one value per row

    def stop(self) -> None: ...  # drop the revision's params


def parse_items(spec: str, n_items: int | None = None) -> range:
    """"A:B" -> range(A, B) (B excluded), checked against the dataset's size when given."""
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise NeoXError(f"--items {spec!r}: expected START:STOP integers (STOP excluded), e.g. 0:4096") from None
    if not 0 <= a < b:
        raise NeoXError(f"--items {spec!r}: need 0 <= START < STOP")
    if n_items is not None and b > n_items:
        raise NeoXError(f"--items {spec!r}: the dataset has {n_items} items (0:{n_items})")
    return range(a, b)


def gather(dataset, items: Sequence[int], length: int) -> np.ndarray:
    """The first `length` tokens of each item -> [len(items), length] int32; an item shorter than that is an error
    naming it."""
    out = np.empty((len(items), length), np.int32)
    for j, i in enumerate(items):
        seq = np.asarray(dataset[i])
        if seq.ndim != 1 or len(seq) < length:
            raise NeoXError(f"item {i}: {seq.shape} tokens, expected at least {length} (a 1-d sequence)")
        out[j] = seq[:length]
    return out


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
    length: int,
    batch: int,
    results: Path,
    extra=None,
    log=print,
) -> dict:
    """Scores what is missing; returns {"rows": the rows for these revisions x items, "scored": pairs scored now,
    "skipped": pairs already there, "duplicates": {revision: earlier revision with the same weights}}.
    length: tokens of each item the study reads; extra(item) -> dict of more row fields (e.g. the data step)."""
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
    return {"rows": latest(rows, revs.names, items), "scored": scored, "skipped": total - n_todo, "duplicates": duplicates}


def by_revision(rows: list[dict], revisions: Sequence[str]) -> dict[str, list[dict]]:
    out = {r: [] for r in revisions}
    for row in rows:
        out[row["revision"]].append(row)
    return out


def plot_over_steps(path: Path, title: str, series: dict[str, list[tuple[int, float]]], ylabel: str) -> Path | None:
    """One line per series of (step, value) points, against training step (symlog x, so step 0 shows); written to
    a temporary name and renamed. None when nothing has a step (e.g. a local checkpoint)."""
    series = {k: sorted(v) for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.2, label=name)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("training step (checkpoint)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
