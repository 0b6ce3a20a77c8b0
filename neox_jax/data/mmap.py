"""Reading Megatron MMIDIDX datasets (GPT-NeoX's `MMapIndexedDataset`, v1): a memory-mapped `.idx` + `.bin` pair.

    PREFIX.idx, little-endian:
      b"MMIDIDX\\x00\\x00"   9 bytes      magic
      <Q  version (1)                 8 bytes
      <B  dtype code (DTYPES)         1 byte
      <Q  items                       8 bytes
      <Q  doc_idx entries             8 bytes      (header: 34 bytes)
      int32 sizes[items]                           tokens of each item
      int64 pointers[items]                        byte offset of each item in PREFIX.bin
      int64 doc_idx[entries]                       first item of each document, then `items`
    PREFIX.bin: the tokens of every item, back to back; or byte-split shards PREFIX-00000-of-000MM.bin ... (Pythia's
    preshuffled Pile on the Hub), read here as one file.

Opening reads the 34-byte header and memory-maps the rest: O(1), whatever the size. It checks the magic, version,
dtype code, the .idx length against its header, and the .bin length against the last item's end. `check()` scans
every pointer against the sizes (O(items), in chunks); each read checks the pointers of the items it touches.
Offsets are int64 throughout: a sum of int32 sizes overflows past 2^31 tokens.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np

from neox_jax.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, items, doc_idx entries: 34 bytes
# GPT-NeoX's codes (megatron/data/indexed_dataset.py). megatron-core swaps 6 and 7 (float64 = 6, float32 = 7);
# token data never uses them.
DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
CODES = {np.dtype(t): c for c, t in DTYPES.items()}
CHECK_CHUNK = 1 << 22  # items per step of check(): 48 MiB of index at a time


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in CODES:
        raise DataError(f"dtype {dt} has no MMIDIDX code; expected one of {sorted(map(str, CODES))}")
    return CODES[dt]


def shard_paths(prefix: str | os.PathLike) -> list[Path]:
    """PREFIX-00000-of-000MM.bin ... in order, or [] when there are none. The set must run 0, 1, ... with one MM (the
    last index, as Pythia names them, or the count); a gap is an error naming the missing shard."""
    prefix = Path(prefix)
    pattern = re.compile(re.escape(prefix.name) + r"-(\d{5})-of-(\d{5})\.bin$")
    found = {}
    if prefix.parent.is_dir():
        for p in prefix.parent.iterdir():
            if m := pattern.match(p.name):
                found[int(m.group(1))] = (int(m.group(2)), p)
    if not found:
        return []
    ofs = {of for of, _ in found.values()}
    if len(ofs) > 1:
        raise DataError(f"{prefix}-*-of-*.bin: shards of different sets ({sorted(ofs)}); keep one set")
    (of,) = ofs
    complete_as_count = len(found) == of and max(found) == of - 1  # 0 .. MM-1: MM is the count
    for i in range(of if complete_as_count else of + 1):
        if i not in found:
            raise DataError(f"{prefix}-{i:05d}-of-{of:05d}.bin: missing shard ({len(found)} of the set present)")
    return [found[i][1] for i in sorted(found)]


def bin_files(prefix: str | os.PathLike) -> list[Path]:
    """The data files of a prefix: [PREFIX.bin] when it exists, else its shards."""
    single = Path(f"{prefix}.bin")
    if single.is_file():
        return [single]
    shards = shard_paths(prefix)
    if not shards:
        raise DataError(f"{single}: no such file (and no shards {Path(prefix).name}-00000-of-NNNNN.bin beside it)")
    return shards


def read_header(path: Path) -> tuple[np.dtype, int, int]:
    """(dtype, items, doc_idx entries) from an .idx file, with the file's size checked against them."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (a dataset prefix names PREFIX.idx and PREFIX.bin)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if head[:9] != MAGIC:
        hint = (
            " (TNTIDX is Megatron's older 'cached' format; re-tokenize as mmap)" if head.startswith(b"TNTIDX") else ""
        )
        raise DataError(f"{path}: not an MMIDIDX index: magic {head[:9]!r}, expected {MAGIC!r}{hint}")
    if len(head) < HEADER.size:
        raise DataError(f"{path}: truncated header: {len(head)} bytes, expected {HEADER.size}")
    _, version, code, items, docs = HEADER.unpack(head)
    if version != VERSION:
        raise DataError(f"{path}: MMIDIDX version {version}, expected {VERSION}")
    if code not in DTYPES:
        raise DataError(f"{path}: dtype code {code}, expected one of {sorted(DTYPES)} ({DTYPES})")
    want = HEADER.size + 12 * items + 8 * docs
    if size != want:
        raise DataError(
            f"{path}: {size} bytes, but its header ({items} items, {docs} doc_idx entries) needs {want} bytes"
        )
    return np.dtype(DTYPES[code]), items, docs


def _map(path: Path) -> np.ndarray:
    """The bytes of a file, memory-mapped ([n] uint8); an empty file (np.memmap refuses those) as an empty array."""
    return np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.zeros((0,), np.uint8)


class IndexedDataset:
    """A Megatron MMIDIDX dataset, memory-mapped. len(ds) items; ds[i] is item i as a read-only 1-D array (a view of
    the file unless it straddles two shards); ds.sizes [items] int32, ds.pointers [items] int64, ds.doc_idx
    [documents + 1] int64, ds.dtype."""

    def __init__(self, prefix: str | os.PathLike, shards: list[tuple[Path, int]] | None = None):
        """shards: the data files and their sizes, in order, when they are not PREFIX.bin / PREFIX-*-of-*.bin found
        on disk (a Hub dataset of which only some shards are downloaded); reading from an absent one is an error."""
        prefix = str(prefix)
        for ext in (".idx", ".bin"):  # `PREFIX.bin` given for PREFIX: be kind
            if prefix.endswith(ext) and not Path(prefix + ".idx").exists():
                prefix = prefix[: -len(ext)]
        self.prefix = prefix
        self.idx_path = Path(prefix + ".idx")
        self.dtype, items, docs = read_header(self.idx_path)
        self.itemsize = self.dtype.itemsize
        idx = _map(self.idx_path)
        off = HEADER.size
        self.sizes = np.frombuffer(idx, np.int32, items, off)  # [items]
        self.pointers = np.frombuffer(idx, np.int64, items, off + 4 * items)  # [items] byte offsets
        self.doc_idx = np.frombuffer(idx, np.int64, docs, off + 12 * items)  # [documents + 1]
        if shards is None:
            self.bin_paths = bin_files(prefix)
            lengths = [p.stat().st_size for p in self.bin_paths]
        else:
            self.bin_paths, lengths = [Path(p) for p, _ in shards], [int(n) for _, n in shards]
            for p, n in zip(self.bin_paths, lengths, strict=True):
                if p.is_file() and p.stat().st_size != n:
                    raise DataError(f"{p}: {p.stat().st_size} bytes, expected {n}")
        self._bins = [_map(p) if p.is_file() else None for p in self.bin_paths]  # None: a shard not present
        self.bin_sizes = lengths  # bytes of each data file
        self._starts = np.cumsum([0] + lengths, dtype=np.int64)  # [shards + 1] byte offset of each shard
        self.nbytes = int(self._starts[-1])
        want = int(self.pointers[-1]) + int(self.sizes[-1]) * self.itemsize if items else 0
        where = self.bin_paths[0] if len(self.bin_paths) == 1 else f"{prefix}-*-of-*.bin ({len(self.bin_paths)} shards)"
        if items and int(self.pointers[0]) != 0:
            raise DataError(f"{self.idx_path}: item 0 starts at byte {int(self.pointers[0])}, expected 0")
        if self.nbytes != want:
            last = (
                f" (item {items - 1}: {int(self.sizes[-1])} tokens at byte {int(self.pointers[-1])})" if items else ""
            )
            raise DataError(
                f"{where}: {self.nbytes} bytes, but {self.idx_path} needs {want}{last}: "
                f"{'truncated' if self.nbytes < want else 'longer than its index'}"
            )

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return self.nbytes // self.itemsize

    @property
    def num_documents(self) -> int:
        return max(len(self.doc_idx) - 1, 0)

    def _item(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.prefix}: item {i} out of range ({n} items)")
        return i % n

    def _check_span(self, first: int, stop: int) -> None:
        """Items [first, stop) lie back to back where the pointers say (each pointer = previous + size)."""
        ptr = self.pointers[first : stop + 1 if stop < len(self) else stop].astype(np.int64)
        ends = ptr[:-1] + self.sizes[first : first + len(ptr) - 1].astype(np.int64) * self.itemsize
        bad = np.flatnonzero(ptr[1:] != ends)
        if bad.size:
            j = first + int(bad[0]) + 1
            raise DataError(
                f"{self.idx_path}: item {j} starts at byte {int(self.pointers[j])}, but the sizes put it at "
                f"{int(ends[bad[0]])} (pointers disagree with sizes)"
            )

    def read_bytes(self, start: int, nbytes: int) -> np.ndarray:
        """[nbytes] uint8 of the data from byte `start`: a view within one shard, a copy across shards."""
        s = min(int(np.searchsorted(self._starts, start, side="right")) - 1, len(self._bins) - 1)
        local = start - int(self._starts[s])
        parts, left = [], nbytes
        while left > 0 or not parts:
            if self._bins[s] is None:
                raise DataError(f"{self.bin_paths[s]}: not present (bytes [{start}, {start + nbytes}) lie in it)")
            piece = self._bins[s][local : local + left]
            if len(piece) == nbytes:
                return piece  # within one shard: a view
            parts.append(piece)
            left -= len(piece)
            s, local = s + 1, 0
        return np.concatenate(parts)

    def tokens(self, start_byte: int, count: int) -> np.ndarray:
        """[count] tokens from byte `start_byte` of the data."""
        if start_byte < 0 or start_byte + count * self.itemsize > self.nbytes:
            raise DataError(
                f"{self.idx_path}: tokens at bytes [{start_byte}, {start_byte + count * self.itemsize}) lie outside "
                f"the data ({self.nbytes} bytes)"
            )
        return np.frombuffer(self.read_bytes(start_byte, count * self.itemsize), self.dtype, count)

    def __getitem__(self, i):
        """Item i: [sizes[i]] tokens (read-only); a slice a:b gives the list of those items (GPT-NeoX's)."""
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise IndexError(f"{self.prefix}: slices of a dataset must be contiguous (step 1), got {i}")
            if stop <= start:
                return []
            flat = self.span(start, stop)
            return np.split(flat, np.cumsum(self.sizes[start:stop], dtype=np.int64)[:-1])
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of item i (GPT-NeoX's `get`): [length] (read-only)."""
        i = self._item(int(i))
        self._check_span(i, min(i + 1, len(self)))
        size = int(self.sizes[i])
        length = size - offset if length is None else length
        if not (0 <= offset and 0 <= length and offset + length <= size):
            raise IndexError(f"{self.prefix}: tokens [{offset}, {offset + length}) of item {i} ({size} tokens)")
        return self.tokens(int(self.pointers[i]) + offset * self.itemsize, length)

    def span(self, first: int, stop: int) -> np.ndarray:
        """The tokens of items [first, stop) back to back: [sum of their sizes] (read-only; one slice of the file)."""
        if not 0 <= first <= stop <= len(self):
            raise IndexError(f"{self.prefix}: items [{first}, {stop}) out of range ({len(self)} items)")
        if first == stop:
            return np.zeros((0,), self.dtype)
        self._check_span(first, stop)
        start = int(self.pointers[first])
        end = int(self.pointers[stop - 1]) + int(self.sizes[stop - 1]) * self.itemsize
        return self.tokens(start, (end - start) // self.itemsize)

    def check(self, progress: bool = False) -> None:
        """Every pointer against the sizes, and doc_idx (starts at 0, never decreases, ends at len(ds)): O(items)."""
        from tqdm import tqdm

        n = len(self)
        if (self.sizes < 0).any():
            j = int(np.flatnonzero(self.sizes < 0)[0])
            raise DataError(f"{self.idx_path}: item {j} has a negative size {int(self.sizes[j])}")
        bar = tqdm(total=n, unit="item", desc=f"check {Path(self.prefix).name}", disable=not progress)
        for first in range(0, n, CHECK_CHUNK):
            self._check_span(first, min(first + CHECK_CHUNK, n))
            bar.update(min(CHECK_CHUNK, n - first))
        bar.close()
        d = self.doc_idx
        if len(d) and (int(d[0]) != 0 or int(d[-1]) != n or (len(d) > 1 and (np.diff(d) < 0).any())):
            raise DataError(
                f"{self.idx_path}: doc_idx must start at 0, never decrease and end at {n} (items); found "
                f"{int(d[0])} ... {int(d[-1])}"
            )

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}: {len(self)} items, {self.num_tokens} {self.dtype} tokens)"
