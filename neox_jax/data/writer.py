"""Writing Megatron MMIDIDX datasets (the format in mmap.py), so GPT-NeoX, megatron-core and this package read them.

A `Writer` streams items into temporary files beside the prefix and renames them into place only when closed without
an error: PREFIX.bin first, PREFIX.idx last, so a crash leaves no PREFIX.idx that does not match its PREFIX.bin (the
.idx is what makes a prefix readable). Pointers are int64 sums of the sizes: correct past 2^31 tokens.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from neox_jax.data.mmap import HEADER, MAGIC, VERSION, DataError, IndexedDataset, dtype_code


def best_dtype(vocab_size: int) -> np.dtype:
    """GPT-NeoX's choice (`__best_fitting_dtype`): uint16 below 65,500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def pointers_of(sizes: np.ndarray, itemsize: int) -> np.ndarray:
    """[items] int64 byte offsets: 0, then the running sum of sizes * itemsize (int64: no overflow at 2^31)."""
    out = np.zeros(len(sizes), np.int64)
    np.cumsum(np.asarray(sizes[:-1], np.int64) * itemsize, out=out[1:])
    return out


def temp_beside(path: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return Path(name)


def write_index(path: str | os.PathLike, sizes, doc_idx, dtype) -> None:
    """An .idx for items of `sizes` tokens ([items], each < 2^31) and documents `doc_idx` ([documents + 1]), written
    to a temporary name and renamed over `path`."""
    path = Path(path)
    sizes = np.asarray(sizes, np.int64)
    if sizes.size and (sizes.min() < 0 or sizes.max() >= 2**31):
        raise DataError(f"{path}: item sizes must be in [0, 2^31) (int32 in the index); found {sizes.max()}")
    doc_idx = np.asarray(doc_idx, np.int64)
    code, itemsize = dtype_code(dtype), np.dtype(dtype).itemsize
    tmp = temp_beside(path, ".idx.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, code, len(sizes), len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers_of(sizes, itemsize).astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Writer:
    """with Writer(prefix, np.uint16) as w: w.add_item(tokens); w.end_document() ... -> PREFIX.bin + PREFIX.idx.

    Items added after the last end_document() form the last document. An existing prefix is replaced only with
    overwrite=True (its old .idx goes first, so the old and new files are never paired)."""

    def __init__(self, prefix: str | os.PathLike, dtype, overwrite: bool = False):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        self.bin_path, self.idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        if not overwrite and (self.bin_path.exists() or self.idx_path.exists()):
            raise DataError(f"{self.idx_path}: already exists (pass overwrite=True / --overwrite to replace it)")
        if not self.prefix.parent.is_dir():
            raise DataError(f"{self.prefix.parent}: no such directory for the dataset {self.prefix.name}")
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._range = (info.min, info.max) if info else None
        self.sizes = array("q")
        self.doc_idx = array("q", [0])
        self._tmp = temp_beside(self.bin_path, ".bin.tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in close())

    def add_item(self, tokens, record: bool = True) -> None:
        """One item: [n] tokens, stored as the writer's dtype (a value that does not fit is an error, not a cast)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"{self.prefix}: an item is a 1-D array of tokens; got shape {arr.shape}")
        if arr.dtype != self.dtype:
            if arr.size and self._range and (arr.min() < self._range[0] or arr.max() > self._range[1]):
                raise DataError(
                    f"{self.prefix}: token {arr.max() if arr.max() > self._range[1] else arr.min()} does not fit "
                    f"{self.dtype} (range {self._range[0]}..{self._range[1]}); write with a wider dtype"
                )
            arr = arr.astype(self.dtype)
        self._file.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        if record:
            self.sizes.append(arr.size)

    def add_documents(self, flat, sizes) -> None:
        """Many items at once, each its own document: flat [sum(sizes)] tokens cut into items of `sizes` tokens."""
        sizes = np.asarray(sizes, np.int64)
        if sizes.sum() != len(flat):
            raise DataError(f"{self.prefix}: {len(flat)} tokens, but the sizes add up to {int(sizes.sum())}")
        self.add_item(flat, record=False)
        start = len(self.sizes)
        self.sizes.extend(sizes.tolist())
        self.doc_idx.extend((start + np.flatnonzero(sizes) + 1).tolist())  # empty items join the next document

    def end_document(self) -> None:
        if len(self.sizes) > self.doc_idx[-1]:
            self.doc_idx.append(len(self.sizes))

    def close(self, ok: bool = True) -> None:
        """Renames the files into place (ok) or removes them (not ok)."""
        self._file.close()
        try:
            if ok:
                self.end_document()
                sizes = np.frombuffer(self.sizes, np.int64) if len(self.sizes) else np.zeros((0,), np.int64)
                self.idx_path.unlink(missing_ok=True)
                os.replace(self._tmp, self.bin_path)
                write_index(self.idx_path, sizes, np.frombuffer(self.doc_idx, np.int64), self.dtype)
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def write_indexed(
    prefix: str | os.PathLike, items: Iterable, dtype=np.uint16, doc_idx: Sequence[int] | None = None
) -> IndexedDataset:
    """Writes items (1-D token arrays) as PREFIX.bin / PREFIX.idx, replacing any existing pair, and opens it. Each
    item is one document unless doc_idx ([documents + 1] first items, ending at len(items)) says otherwise."""
    with Writer(prefix, dtype, overwrite=True) as w:
        for item in items:
            w.add_item(item)
            if doc_idx is None:
                w.end_document()
        if doc_idx is not None:
            if list(doc_idx[:1]) != [0] or doc_idx[-1] != len(w.sizes) or any(np.diff(doc_idx) < 0):
                raise DataError(f"{prefix}: doc_idx must run from 0 up to {len(w.sizes)} (the items); got {doc_idx}")
            w.doc_idx = array("q", [int(d) for d in doc_idx])
    return IndexedDataset(prefix)
