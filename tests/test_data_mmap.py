"""Megatron MMIDIDX datasets: files from an independent reference writer (struct.pack per the documented format) and
from megatron-core read identically; our writer's files read in megatron-core; the errors name the file, the
expected and the found value; a > 2^31-token index over a sparse .bin has correct 64-bit pointers; the Pythia step
layout."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from neox_jax.data import DataError, IndexedDataset, pythia_batch, pythia_items, write_index, write_indexed

CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float32: 6, np.float64: 7, np.uint16: 8}


def reference_write(prefix, items, dtype, doc_idx=None, pointers=None, version=1, code=None, magic=b"MMIDIDX\x00\x00"):
    """The format as GPT-NeoX's indexed_dataset.py v1 documents it, written field by field (not by our writer)."""
    itemsize = np.dtype(dtype).itemsize
    sizes = [len(it) for it in items]
    if pointers is None:
        pointers, at = [], 0
        for s in sizes:
            pointers.append(at)
            at += s * itemsize
    doc_idx = list(range(len(items) + 1)) if doc_idx is None else doc_idx
    with open(f"{prefix}.bin", "wb") as f:
        for it in items:
            f.write(np.asarray(it, dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(magic)
        f.write(struct.pack("<Q", version))
        f.write(struct.pack("<B", CODES[dtype] if code is None else code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def _items(rng, n, hi, dtype):
    return [rng.integers(0, hi, rng.integers(0, 9)).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8, np.int64])
def test_reference_files_read_identically(tmp_path, dtype):
    rng = np.random.default_rng(0)
    items = _items(rng, 23, 250, dtype)
    reference_write(tmp_path / "ref", items, dtype, doc_idx=[0, 5, 5, 17, 23])
    ds = IndexedDataset(tmp_path / "ref")
    assert len(ds) == 23 and ds.dtype == np.dtype(dtype) and ds.num_documents == 4
    assert ds.num_tokens == sum(map(len, items)) and list(ds.doc_idx) == [0, 5, 5, 17, 23]
    for i, it in enumerate(items):
        np.testing.assert_array_equal(ds[i], it)
        assert ds[i].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds[-1], items[-1])
    np.testing.assert_array_equal(ds.span(3, 9), np.concatenate(items[3:9]))
    assert [x.tolist() for x in ds[3:9]] == [x.tolist() for x in items[3:9]] and ds[5:5] == []
    ds.check()
    # our writer produces the same bytes as the reference
    write_indexed(tmp_path / "ours", items, dtype, doc_idx=[0, 5, 5, 17, 23])
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_megatron_core_reads_ours_and_we_read_its(tmp_path):
    pytest.importorskip("torch")
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    rng = np.random.default_rng(1)
    items = [rng.integers(0, 50000, rng.integers(1, 40)).astype(np.uint16) for _ in range(30)]
    write_indexed(tmp_path / "ours", items, np.uint16)
    theirs = mcore.IndexedDataset(str(tmp_path / "ours"), mmap=True)
    assert len(theirs) == 30
    for i, it in enumerate(items):
        np.testing.assert_array_equal(theirs[i], it)
    np.testing.assert_array_equal(theirs.document_indices, np.arange(31))

    import torch

    b = mcore.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.int32)
    for k in range(0, 30, 3):
        for it in items[k : k + 3]:
            b.add_item(torch.from_numpy(it.astype(np.int32)))
        b.end_document()
    b.finalize(str(tmp_path / "mc.idx"))
    ds = IndexedDataset(tmp_path / "mc")
    ds.check()
    assert ds.dtype == np.int32 and list(ds.doc_idx) == list(range(0, 31, 3))
    for i, it in enumerate(items):
        np.testing.assert_array_equal(ds[i], it)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(magic=b"TNTIDX\x00\x00\x00"), r"bad\.idx: not an MMIDIDX index: magic b'TNTIDX.*expected b'MMIDIDX"),
        (dict(version=2), r"bad\.idx: MMIDIDX version 2, expected 1"),
        (dict(code=9), r"bad\.idx: dtype code 9, expected one of \[1, 2, 3, 4, 5, 6, 7, 8\]"),
    ],
)
def test_header_errors_name_file_expected_found(tmp_path, kw, match):
    reference_write(tmp_path / "bad", [np.arange(4)], np.uint16, **kw)
    with pytest.raises(DataError, match=match):
        IndexedDataset(tmp_path / "bad")


def test_truncated_and_mismatched_files(tmp_path):
    items = [np.arange(5), np.arange(7), np.arange(3)]
    reference_write(tmp_path / "t", items, np.uint16)
    with open(tmp_path / "t.bin", "r+b") as f:
        f.truncate(28)  # 15 tokens = 30 bytes
    with pytest.raises(DataError, match=r"t\.bin: 28 bytes, but .*t\.idx needs 30 .*truncated"):
        IndexedDataset(tmp_path / "t")
    reference_write(tmp_path / "p", items, np.uint16, pointers=[0, 12, 24])  # item 1 should start at 10
    ds = IndexedDataset(tmp_path / "p")  # the O(1) checks at open pass (the last item ends where the file does)
    with pytest.raises(DataError, match=r"p\.idx: item 1 starts at byte 12, but the sizes put it at 10"):
        ds.check()
    with pytest.raises(DataError, match=r"p\.idx: item 1 starts at byte 12, but the sizes put it at 10"):
        ds[0]
    reference_write(tmp_path / "i", items, np.uint16)
    with open(tmp_path / "i.idx", "ab") as f:
        f.write(b"\x00" * 4)
    with pytest.raises(DataError, match=r"i\.idx: 106 bytes, but its header \(3 items, 4 doc_idx entries\) needs 102"):
        IndexedDataset(tmp_path / "i")
    with pytest.raises(DataError, match=r"nothing\.idx: no such file"):
        IndexedDataset(tmp_path / "nothing")
    with pytest.raises(DataError, match="does not fit uint16"):
        write_indexed(tmp_path / "w", [np.array([70000])], np.uint16)
    assert not list(tmp_path.glob("w*")) and not list(tmp_path.glob(".w*"))  # nothing half-written is left


def test_beyond_2_31_tokens_sparse_file(tmp_path):
    """4 items of 2^30 + 3 uint16 tokens (> 2^32 tokens, > 2^33 bytes): pointers are int64 sums; reading the last item
    maps only its pages."""
    n = 2**30 + 3
    write_index(tmp_path / "big.idx", [n] * 4, [0, 2, 4], np.uint16)
    total = 4 * n * 2
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(total)  # sparse: no blocks on disk
        f.seek(3 * n * 2)
        f.write(np.array([11, 22, 33], np.uint16).tobytes())
        f.seek(total - 4)
        f.write(np.array([44, 55], np.uint16).tobytes())
    ds = IndexedDataset(tmp_path / "big")
    assert ds.pointers.dtype == np.int64 and list(ds.pointers) == [0, 2 * n, 4 * n, 6 * n]
    assert ds.num_tokens == 4 * n > 2**32 and ds.nbytes == total
    last = ds[3]
    assert last.shape == (n,) and list(last[:3]) == [11, 22, 33] and list(last[-2:]) == [44, 55]
    assert list(ds.get(3, n - 2)) == [44, 55]
    ds.check()


def test_shards_open_as_one_and_items_straddle(tmp_path):
    rng = np.random.default_rng(2)
    items = [rng.integers(0, 60000, 9).astype(np.uint16) for _ in range(10)]  # 180 bytes
    write_indexed(tmp_path / "whole", items, np.uint16)
    data = (tmp_path / "whole.bin").read_bytes()
    for k, lo in enumerate(range(0, 180, 50)):  # 4 shards of 50 bytes, Pythia's naming (MM = the last index)
        (tmp_path / f"document-{k:05d}-of-00003.bin").write_bytes(data[lo : lo + 50])
    (tmp_path / "document.idx").write_bytes((tmp_path / "whole.idx").read_bytes())
    ds = IndexedDataset(tmp_path / "document")
    assert len(ds.bin_paths) == 4
    for i, it in enumerate(items):  # item 2 (bytes 36-54) straddles shards 0 and 1
        np.testing.assert_array_equal(ds[i], it)
    np.testing.assert_array_equal(pythia_batch(ds, 1, batch_size=5, seq_len=9), np.stack(items[5:]))
    (tmp_path / "document-00002-of-00003.bin").unlink()
    with pytest.raises(DataError, match=r"document-00002-of-00003\.bin: missing shard"):
        IndexedDataset(tmp_path / "document")


def test_pythia_step_layout(tmp_path):
    seq = 7
    items = [np.full(seq, k, np.uint16) + np.arange(seq, dtype=np.uint16) for k in range(12)]
    ds = write_indexed(tmp_path / "pre", items, np.uint16)
    assert pythia_items(2, 4) == range(8, 12) and pythia_items(0) == range(0, 1024)
    b = pythia_batch(ds, 2, batch_size=4, seq_len=seq)
    assert b.shape == (4, seq) and not b.flags.writeable
    np.testing.assert_array_equal(b, np.stack(items[8:12]))
    with pytest.raises(DataError, match=r"step 3 needs items \[12, 16\), but the dataset holds 12 items"):
        pythia_batch(ds, 3, batch_size=4, seq_len=seq)
    with pytest.raises(DataError, match="item 4 \\(step 1\\) holds 7 tokens, expected seq_len 8"):
        pythia_batch(ds, 1, batch_size=4, seq_len=8)
