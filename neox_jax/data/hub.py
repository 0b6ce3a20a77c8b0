"""Datasets on the Hugging Face Hub by id (EleutherAI/pile-deduped-pythia-preshuffled style repos), through
huggingface_hub with the Hub's sha256 checked on every file (store.hub's verification), downloading only the shards
a command needs.

    ORG/NAME                  the repo's one PREFIX.idx (its .bin, or its PREFIX-000NN-of-000MM.bin shards)
    ORG/NAME/PATH/PREFIX      a prefix of a repo that holds several
    ...@REVISION              a branch, tag or commit (default main)

The listing (one request) gives every file's size and sha256, so the index alone says which shards hold a batch:
`open_dataset(source, items=range(a, b))` downloads the .idx and just those shards; a read outside them is an error
naming the absent shard. Files land in the Hugging Face cache (HF_HUB_CACHE), as `hf download --repo-type dataset`
puts them; a second call finds them there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from neox_jax.data.mmap import HEADER, IndexedDataset, read_header
from neox_jax.errors import DataError
from neox_jax.store import hub

SHARD = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.bin$")


def is_dataset_id(source: str | os.PathLike) -> bool:
    """ORG/NAME[/PATH...][@REV] that is not a local path (PREFIX.idx or a folder)."""
    s = str(source)
    if Path(s + ".idx").exists() or Path(s).exists() or s.startswith((".", "/")):
        return False
    return re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w./-]+)?(@[\w./-]+)?", s) is not None


def split_id(source: str) -> tuple[str, str | None, str]:
    """'ORG/NAME/PATH@REV' -> ('ORG/NAME', 'PATH' or None, 'REV')."""
    s, _, rev = str(source).partition("@")
    parts = s.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, rev or "main"


def resolve(repo_id: str, revision: str, s: hub.Settings) -> hub.Resolved:
    """One request: the commit and {file: {size, sha256 / git_sha1}} of a dataset repo."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=s.endpoint, token=s.token).dataset_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        err = hub._translate(e, repo_id, revision, s)
        if err is not None:
            raise err from None
        raise
    expected = {}
    for sib in info.siblings or []:
        e = {"size": sib.size, "git_sha1": sib.blob_id}
        if sib.lfs is not None:
            e.update(sha256=sib.lfs.sha256, size=sib.lfs.size)
        expected[sib.rfilename] = e
    return hub.Resolved(repo_id, revision, info.sha, expected)


def _download(r: hub.Resolved, name: str, s: hub.Settings) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        path = Path(
            hf_hub_download(r.repo_id, name, repo_type="dataset", revision=r.commit, cache_dir=s.cache_dir,
                            endpoint=s.endpoint, token=s.token)
        )  # fmt: skip
    except OSError as e:
        err = hub._translate(e, r.repo_id, r.revision, s)
        if err is not None:
            raise err from None
        raise
    hub._verify(r, name, path)  # the Hub's sha256 (git sha1 for small files); a bad copy is removed and refused
    return path


def layout(r: hub.Resolved, path: str | None) -> tuple[str, list[str]]:
    """(the .idx file, its data files in order) of the prefix `path` (None: the repo's only .idx)."""
    idx = sorted(f for f in r.expected if f.endswith(".idx"))
    if path is not None:
        idx = [f for f in idx if f == path + ".idx" or f == path]
    if len(idx) != 1:
        where = f"{r.repo_id}@{r.revision}"
        raise DataError(
            f"{where}: {'no' if not idx else 'several'} dataset index{'es' if idx else ''} "
            f"{'matching ' + repr(path) if path else ''} ({idx or 'no .idx files'}); name one as ORG/NAME/PREFIX"
        )
    prefix = idx[0][: -len(".idx")]
    if prefix + ".bin" in r.expected:
        return idx[0], [prefix + ".bin"]
    shards = sorted(f for f in r.expected if (m := SHARD.match(f)) and m.group(1) == prefix)
    if not shards:
        raise DataError(f"{r.repo_id}@{r.revision}: {idx[0]} has no {prefix}.bin and no {prefix}-NNNNN-of-MMMMM.bin")
    return idx[0], shards


def needed(idx_path: Path, sizes: list[int], items: range | None) -> list[int]:
    """The shard numbers holding items [a, b) (all of them for None), from the index alone."""
    if items is None:
        return list(range(len(sizes)))
    dtype, n, _ = read_header(idx_path)
    if not len(items) or items.stop > n:
        return []  # IndexedDataset's own checks report it
    mm = np.memmap(idx_path, np.uint8, mode="r")
    ptr = np.frombuffer(mm, np.int64, n, HEADER.size + 4 * n)
    size = np.frombuffer(mm, np.int32, n, HEADER.size)
    start, end = int(ptr[items.start]), int(ptr[items.stop - 1]) + int(size[items.stop - 1]) * dtype.itemsize
    bounds = np.cumsum([0] + sizes)
    return [k for k in range(len(sizes)) if bounds[k] < end and bounds[k + 1] > start]


def open_dataset(source: str, items: range | None = None, settings: hub.Settings | None = None) -> IndexedDataset:
    """The dataset `source` names (module docstring), with the .idx and the shards holding `items` (None: every
    shard) downloaded and verified."""
    s = settings or hub.Settings.from_env()
    if s.offline:
        raise DataError(f"{source}: Hub datasets need the network (HF_HUB_OFFLINE is set); download them first")
    repo_id, path, revision = split_id(source)
    r = resolve(repo_id, revision, s)
    idx_name, bins = layout(r, path)
    idx_path = _download(r, idx_name, s)
    sizes = [int(r.expected[b]["size"]) for b in bins]
    want = set(needed(idx_path, sizes, items))
    root = Path(str(idx_path)[: -len(idx_name)])  # the snapshot folder
    paths = [_download(r, b, s) if k in want else root / b for k, b in enumerate(bins)]
    return IndexedDataset(str(idx_path)[: -len(".idx")], shards=list(zip(paths, sizes, strict=True)))


def open_any(source: str, items: range | None = None) -> IndexedDataset:
    """A local prefix, or a Hub dataset id."""
    return open_dataset(source, items) if is_dataset_id(source) else IndexedDataset(source)
