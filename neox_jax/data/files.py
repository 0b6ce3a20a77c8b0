"""A dataset's files: sha256 checksum lists, verifying against one, merging (unsharding) and sharding `.bin` files.

Checksum lists are read in both common forms, one file a line: `sha256  filename` (sha256sum's, what merge and shard
write) and `filename sha256` (Pythia's utils/shard_hashes.txt). Shards are byte ranges of one `.bin`, named
NAME-00000-of-000MM.bin ... NAME-000MM-of-000MM.bin (MM the last index, as Pythia's preshuffled Pile is), beside
NAME.idx. Every output goes to a temporary name and is renamed when complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from neox_jax.data.mmap import IndexedDataset
from neox_jax.data.writer import temp_beside, write_index
from neox_jax.errors import DataError

HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
BLOCK = 16 * 2**20
PYTHIA_SHARD_BYTES = 5_000_000_000  # utils/shard_memmap.py


def read_checksums(path: str | os.PathLike) -> dict[str, str]:
    """{file name: sha256} from a checksum list in either form."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checksum list")
    out = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not any(HEX64.match(f) for f in fields):
            raise DataError(f"{path}:{lineno}: expected 'sha256  filename' or 'filename sha256', got {line!r}")
        digest, name = fields if HEX64.match(fields[0]) else fields[::-1]
        out[Path(name.lstrip("*")).name] = digest.lower()
    return out


def write_checksums(path: Path, digests: dict[str, str]) -> Path:
    tmp = temp_beside(path, ".tmp")
    tmp.write_text("".join(f"{d}  {n}\n" for n, d in digests.items()))
    os.replace(tmp, path)
    return path


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress)


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while block := f.read(BLOCK):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def dataset_files(ds: IndexedDataset) -> list[Path]:
    return [ds.idx_path, *ds.bin_paths]


def verify(prefix: str | os.PathLike, checksums: str | os.PathLike | None, progress: bool = True) -> dict[str, str]:
    """Opens the dataset, checks every pointer, and (with a list) the sha256 of each of its files against the list:
    {file name: sha256}. Raises DataError naming each file that is unlisted or differs."""
    from neox_jax.data.hub import open_any

    ds = open_any(str(prefix))
    ds.check(progress)
    want = read_checksums(checksums) if checksums else {}
    found, bad = {}, []
    for p in dataset_files(ds):
        if checksums and p.name not in want:
            bad.append(f"{p}: not in {checksums}")
            continue
        found[p.name] = sha256_file(p, progress)
        if checksums and found[p.name] != want[p.name]:
            bad.append(f"{p}: sha256 {found[p.name]}, expected {want[p.name]} ({checksums})")
    if bad:
        raise DataError("; ".join(bad))
    return found


def _copy_into(out, sources: Iterable[Path], h, bar) -> None:
    for src in sources:
        with open(src, "rb") as f:
            while block := f.read(BLOCK):
                out.write(block)
                h.update(block)
                bar.update(len(block))


def merge(prefixes: list[str], out_prefix: str | os.PathLike, progress: bool = True) -> dict[str, str]:
    """Joins datasets (each a .bin or a set of shards) into OUT.bin / OUT.idx: the items of the first, then the
    second, ...; one sharded input is unsharded. Writes OUT.sha256; returns {file name: sha256}."""
    sets = [IndexedDataset(p) for p in prefixes]
    dtypes = {str(ds.dtype) for ds in sets}
    if len(dtypes) > 1:
        raise DataError(f"merge: the inputs hold different dtypes ({sorted(dtypes)}): {prefixes}")
    out = Path(out_prefix)
    bin_path, idx_path = Path(f"{out}.bin"), Path(f"{out}.idx")
    if bin_path.exists() or idx_path.exists() or any(str(out) == str(ds.prefix) for ds in sets):
        raise DataError(f"{idx_path}: already exists (or is an input); merge writes a new prefix")
    sizes = np.concatenate([ds.sizes.astype(np.int64) for ds in sets])
    docs, base = [np.zeros(1, np.int64)], 0
    for ds in sets:
        docs.append(ds.doc_idx[1:].astype(np.int64) + base)
        base += len(ds)
    h, tmp = hashlib.sha256(), temp_beside(bin_path, ".bin.tmp")
    try:
        with open(tmp, "wb") as f, _bar(sum(ds.nbytes for ds in sets), f"merge -> {bin_path.name}", progress) as bar:
            _copy_into(f, [p for ds in sets for p in ds.bin_paths], h, bar)
        os.replace(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    write_index(idx_path, sizes, np.concatenate(docs), sets[0].dtype)
    IndexedDataset(out).check()
    digests = {bin_path.name: h.hexdigest(), idx_path.name: sha256_file(idx_path)}
    write_checksums(Path(f"{out}.sha256"), digests)
    return digests


def shard(prefix: str | os.PathLike, out_dir: str | os.PathLike, shard_bytes: int = PYTHIA_SHARD_BYTES,
          progress: bool = True) -> dict[str, str]:  # fmt: skip
    """Splits PREFIX's data into OUT_DIR/NAME-00000-of-000MM.bin ... of shard_bytes each (the last shorter), copies
    NAME.idx, writes OUT_DIR/NAME.sha256; returns {file name: sha256}."""
    ds = IndexedDataset(prefix)
    if shard_bytes < 1:
        raise DataError(f"--shard-bytes must be >= 1, got {shard_bytes}")
    out_dir, name = Path(out_dir), Path(ds.prefix).name
    out_dir.mkdir(parents=True, exist_ok=True)
    idx = out_dir / f"{name}.idx"
    if idx.exists() and idx.resolve() != ds.idx_path.resolve():
        raise DataError(f"{idx}: already exists; shard writes into a folder without that dataset")
    count = max(1, -(-ds.nbytes // shard_bytes))
    last = count - 1
    digests = {}
    with _bar(ds.nbytes, f"shard {name}", progress) as bar:
        for i in range(count):
            path = out_dir / f"{name}-{i:05d}-of-{last:05d}.bin"
            if path.exists():
                raise DataError(f"{path}: already exists; shard writes into a folder without that set")
            piece = ds.read_bytes(i * shard_bytes, min(shard_bytes, ds.nbytes - i * shard_bytes))
            h, tmp = hashlib.sha256(), temp_beside(path, ".tmp")
            try:
                with open(tmp, "wb") as f:
                    for lo in range(0, len(piece), BLOCK):
                        block = piece[lo : lo + BLOCK].tobytes()
                        f.write(block)
                        h.update(block)
                        bar.update(len(block))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            digests[path.name] = h.hexdigest()
    if idx.resolve() != ds.idx_path.resolve():
        tmp = temp_beside(idx, ".tmp")
        shutil.copyfile(ds.idx_path, tmp)
        os.replace(tmp, idx)
    digests[idx.name] = sha256_file(idx)
    write_checksums(out_dir / f"{name}.sha256", digests)
    return digests
