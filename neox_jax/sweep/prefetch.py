"""A model's checkpoints, one after another, the next made ready while this one runs.

    revs = Revisions("EleutherAI/pythia-70m", ["step0", "step1000"], "float32")   # every revision resolved here
    for cur in revs.prepared(["step0", "step1000"]):
        use(cur.model)        # a neox_jax.NeoX; cur.duplicate_of names an earlier revision with the same weights

Every revision is resolved before any work (one Hub request each: commit and file hashes), so a misspelt step fails
at once. While the caller works on revision i, a background thread downloads, verifies, converts (once, into the
neox-jax cache) and loads revision i+1; revision i's weights are released when the caller asks for the next one, so at
most two revisions' weights are held. A local checkpoint directory is one revision, named by its folder.

Duplicates (pythia #195: a revision holding another step's weights) are found from the weight files' hashes before
any download, or, when the revisions' files differ in layout or the Hub gave no sha256, from the converted tensors
once each is loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from neox_jax.errors import NeoXError
from neox_jax.store import hub


def prefetched(items: Sequence, prepare: Callable, release: Callable | None = None) -> Iterator:
    """Yields prepare(item) for each item in order; prepare(next item) runs in a background thread while the caller
    works on the current one. release(done) is called when the caller asks for the next, before the one after that is
    prepared: the caller's loop variable still points at the done one then, and must not keep its contents alive."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        nxt = pool.submit(prepare, items[0]) if len(items) else None
        for i in range(len(items)):
            cur = nxt.result()
            nxt = pool.submit(prepare, items[i + 1]) if i + 1 < len(items) else None
            yield cur
            if release is not None:
                release(cur)
            del cur


def fingerprint(r: hub.Resolved) -> str | None:
    """Weights fingerprint: sha256 over (file name, sha256) of the weight files; bit-identical weights in the same
    file layout give the same fingerprint, whatever the commit (None when the Hub gave no sha256)."""
    shas = [(f, r.expected[f].get("sha256")) for f in r.weight_files()]
    if not shas or any(s is None for _, s in shas):
        return None
    return hashlib.sha256("\n".join(f"{f} {s}" for f, s in shas).encode()).hexdigest()


def tensor_fingerprint(params) -> str:
    """For revisions whose weight files differ in layout (safetensors vs .bin, other sharding): sha256 over every
    converted parameter (path, dtype, shape, bytes)."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, x in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(x)
        h.update(f"{jax.tree_util.keystr(path)} {a.dtype} {a.shape}\n".encode())
        h.update(a.tobytes())
    return "tensors:" + h.hexdigest()


@dataclass
class Prepared:
    revision: str
    commit: str | None
    fingerprint: str | None
    model: object  # a neox_jax.NeoX; None when skipped as a duplicate (or once released)
    duplicate_of: str | None = None


class Revisions:
    """model: a hub id with `revisions` (e.g. ["step0", "step1000"]), or a local checkpoint directory (revisions
    None: one revision, the folder's name). first_with: fingerprint -> revision, from an earlier run's rows, so a
    resumed run flags the same duplicates. skip_duplicates: a duplicate is not loaded (model None)."""

    def __init__(
        self,
        model: str,
        revisions: Sequence[str] | None,
        dtype: str = "float32",
        *,
        mesh=None,
        skip_duplicates: bool = False,
        first_with: dict | None = None,
    ):
        self.model, self.dtype, self.mesh, self.skip_duplicates = str(model), dtype, mesh, skip_duplicates
        self.first_with = dict(first_with or {})
        self.local = not hub.is_hub_id(model)
        if self.local:
            if not Path(model).is_dir():
                raise NeoXError(f"--model {model}: no such checkpoint directory, and not a hub id (org/name)")
            if revisions:
                raise NeoXError(f"--model {model} is a local checkpoint: it has no revisions to choose from")
            self.names, self.resolved = [Path(model).resolve().name], {}
            self.file_fp, self.by_tensors, self.dup_of = {}, True, {}
            return
        if not revisions:
            raise NeoXError(f"--model {model}: give the revisions to run (--revisions or --pythia-steps)")
        self.settings = hub.Settings.from_env()
        self.names = list(revisions)
        self.resolved = {r: hub.resolve(self.model, r, self.settings) for r in self.names}  # named errors first
        self.file_fp = {r: fingerprint(x) for r, x in self.resolved.items()}
        layouts = {tuple(x.weight_files()) for x in self.resolved.values()}
        self.by_tensors = len(layouts) > 1 or None in self.file_fp.values()
        self.dup_of = {} if self.by_tensors else {r: self._first(self.file_fp[r], r) for r in self.names}

    def step(self, revision: str) -> int | None:
        return hub.step_of(revision)

    def _first(self, fp: str | None, revision: str) -> str | None:
        """The earlier revision with this fingerprint (None if this is the first); records this one if it is."""
        if fp is None:
            return None
        first = self.first_with.setdefault(fp, revision)
        return first if first != revision else None

    def _prepare(self, revision: str) -> Prepared:
        import neox_jax

        if self.local:
            model = neox_jax.load(self.model, self.dtype, mesh=self.mesh)
            return Prepared(revision, None, None, model)
        r = self.resolved[revision]
        if self.skip_duplicates and self.dup_of.get(revision):  # known from the files: not even downloaded
            return Prepared(revision, r.commit, self.file_fp[revision], None)
        from neox_jax.store import converters

        path = converters.module("hub").checkpoint_for(r, self.dtype, progress=False, settings=self.settings)
        model = neox_jax.load(path, self.dtype, mesh=self.mesh)
        fp = tensor_fingerprint(model.params) if self.by_tensors else self.file_fp[revision]
        return Prepared(revision, r.commit, fp, model)

    def prepared(self, todo: Sequence[str]) -> Iterator[Prepared]:
        """The revisions in `todo`, in order, each loaded (the next one loading meanwhile)."""
        unknown = [r for r in todo if r not in self.names]
        if unknown:
            raise NeoXError(f"revisions {unknown} were not resolved (known: {self.names})")

        def release(p: Prepared) -> None:
            p.model = None  # this revision's weights go before the one after next is loaded

        for cur in prefetched(list(todo), self._prepare, release):
            if self.by_tensors and not self.local:
                self.dup_of[cur.revision] = self._first(cur.fingerprint, cur.revision)
                if self.dup_of[cur.revision] and self.skip_duplicates:
                    cur.model = None
            cur.duplicate_of = self.dup_of.get(cur.revision)
            yield cur
