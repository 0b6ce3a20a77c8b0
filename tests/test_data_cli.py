"""`neox-jax data`: tokenize -> inspect -> batch equals tokens computed independently with the `tokenizers` library;
tokenize leaves no half-written dataset when it fails; verify / merge / shard keep every byte and name what differs."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from neox_jax.cli import main
from neox_jax.data import DataError, IndexedDataset, Writer
from neox_jax.data.tokenize import tokenize_files

DOCS = ["Hello, world!", "", "The king and the queen. " * 7, "é ü 日本", "1 2 3 4 5 6 7 8 9 10 " * 3]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d, "meta": {"i": i}}) + "\n" for i, d in enumerate(DOCS)))
    return path


def test_tokenize_inspect_batch_round_trip(tmp_path, corpus, bpe_tokenizer, capsys):
    rc, out, _ = _cli(capsys, "data", "tokenize", corpus, tmp_path / "ds", "--tokenizer", bpe_tokenizer,
                      "--append-eod", "--no-progress")  # fmt: skip
    assert rc == 0 and "1 empty documents skipped" in out
    tk = Tokenizer.from_file(str(bpe_tokenizer))  # the reference: tokenizers' own encoder, document by document
    eod = tk.token_to_id("<|endoftext|>")
    want = [tk.encode(d).ids + [eod] for d in DOCS if d]
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.dtype == np.uint16 and len(ds) == 4 and list(ds.doc_idx) == [0, 1, 2, 3, 4]
    assert [ds[i].tolist() for i in range(len(ds))] == want

    rc, out, _ = _cli(capsys, "data", "inspect", tmp_path / "ds", "--json")
    info = json.loads(out)
    assert (info["items"], info["documents"], info["tokens"], info["dtype"]) == (4, 4, sum(map(len, want)), "uint16")
    bin_file = next(f for f in info["files"] if f["path"].endswith(".bin"))
    assert bin_file["sha256"] == hashlib.sha256(np.concatenate(want).astype("<u2").tobytes()).hexdigest()

    # batch: step s at batch size 1 is item s; items of other lengths than --seq-len are refused
    for step in (0, 2):
        rc, out, err = _cli(capsys, "data", "batch", tmp_path / "ds", "--step", step, "--batch-size", 1,
                            "--seq-len", len(want[step]), "--out", tmp_path / "b.npy", "--decode", "--tokenizer",
                            bpe_tokenizer)  # fmt: skip
        assert rc == 0, err
        np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.array([want[step]], np.uint16))
        assert out == [d for d in DOCS if d][step] + "<|endoftext|>\n"
    rc, _, err = _cli(capsys, "data", "batch", tmp_path / "ds", "--step", 1, "--batch-size", 2,
                      "--seq-len", len(want[2]), "--out", tmp_path / "b.npy")  # fmt: skip
    assert rc == 1 and f"item 2 (step 1) holds {len(want[2])} tokens" not in err and "(step 1) holds" in err


def test_tokenize_with_the_20b_tokenizer(tmp_path, corpus, tokenizer_file):
    stats = tokenize_files([corpus], tmp_path / "d", tokenizer_file, append_eod=True, progress=False)
    tk = Tokenizer.from_file(str(tokenizer_file))
    assert tk.token_to_id("<|endoftext|>") == 0  # GPT-NeoX's EOD
    want = [tk.encode(d).ids + [0] for d in DOCS if d]
    ds = IndexedDataset(tmp_path / "d")
    assert stats.dtype == "uint16" and ds.dtype == np.uint16  # 50277 ids < 65,500
    assert [ds[i].tolist() for i in range(len(ds))] == want


def test_tokenize_failure_leaves_nothing(tmp_path, corpus, bpe_tokenizer):
    def seen():
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out")))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(corpus.read_text() * 300 + "{not json\n")  # 1500 good documents (one flush of 1024), then a bad line
    with pytest.raises(DataError, match=r"bad\.jsonl:1501: not valid JSON"):
        tokenize_files([bad], tmp_path / "out", bpe_tokenizer, progress=False)
    assert seen() == []
    tokenize_files([corpus], tmp_path / "out", bpe_tokenizer, progress=False)
    with pytest.raises(DataError, match=r"out\.idx: already exists"):
        tokenize_files([corpus], tmp_path / "out", bpe_tokenizer, progress=False)
    before = (tmp_path / "out.idx").read_bytes()
    with pytest.raises(DataError, match="bad.jsonl"):  # --overwrite that fails keeps the old pair intact
        tokenize_files([bad], tmp_path / "out", bpe_tokenizer, overwrite=True, progress=False)
    assert seen() == ["out.bin", "out.idx"] and (tmp_path / "out.idx").read_bytes() == before
    IndexedDataset(tmp_path / "out").check()
    (tmp_path / "sub").mkdir()
    with Writer(tmp_path / "sub" / "w", np.uint16) as w:  # while writing (a crash here): one hidden temporary file
        w.add_item(np.arange(5))
        (tmp,) = (tmp_path / "sub").iterdir()
        assert tmp.name.startswith(".w.bin.") and tmp.name.endswith(".bin.tmp")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["w.bin", "w.idx"]


def test_shard_verify_merge(tmp_path, corpus, bpe_tokenizer, capsys):
    tokenize_files([corpus] * 3, tmp_path / "doc", bpe_tokenizer, append_eod=True, progress=False)
    ds = IndexedDataset(tmp_path / "doc")
    rc, out, _ = _cli(capsys, "data", "shard", tmp_path / "doc", tmp_path / "sh", "--shard-bytes", 25, "--no-progress")
    assert rc == 0
    n = -(-ds.nbytes // 25)
    assert sorted(p.name for p in (tmp_path / "sh").glob("doc-*.bin")) == [
        f"doc-{i:05d}-of-{n - 1:05d}.bin" for i in range(n)
    ]
    sharded = IndexedDataset(tmp_path / "sh" / "doc")
    assert all(np.array_equal(sharded[i], ds[i]) for i in range(len(ds)))
    # Pythia's list form (filename sha256) verifies; a changed byte is named with both hashes
    lines = (tmp_path / "sh" / "doc.sha256").read_text().split("\n")
    pythia_form = tmp_path / "shard_hashes.txt"
    pythia_form.write_text("\n".join(" ".join(line.split()[::-1]) for line in lines if line))
    rc, out, err = _cli(capsys, "data", "verify", tmp_path / "sh" / "doc", "--checksums", pythia_form, "--no-progress")
    assert rc == 0 and out.count("OK") == n + 1, err
    victim = tmp_path / "sh" / f"doc-00001-of-{n - 1:05d}.bin"
    data = bytearray(victim.read_bytes())
    data[3] ^= 1
    victim.write_bytes(bytes(data))
    rc, _, err = _cli(capsys, "data", "verify", tmp_path / "sh" / "doc", "--checksums", pythia_form, "--no-progress")
    assert rc == 1 and f"{victim.name}: sha256 " in err and ", expected " in err
    data[3] ^= 1
    victim.write_bytes(bytes(data))
    # merge: the shards back into one file equal to the original; two datasets joined keep both in order
    rc, _, _ = _cli(capsys, "data", "merge", tmp_path / "sh" / "doc", tmp_path / "whole", "--no-progress")
    assert (tmp_path / "whole.bin").read_bytes() == (tmp_path / "doc.bin").read_bytes()
    assert (tmp_path / "whole.idx").read_bytes() == (tmp_path / "doc.idx").read_bytes()
    rc, _, err = _cli(capsys, "data", "verify", tmp_path / "whole", "--checksums", tmp_path / "whole.sha256")
    assert rc == 0, err
    rc, _, _ = _cli(capsys, "data", "merge", tmp_path / "doc", tmp_path / "whole", tmp_path / "two", "--no-progress")
    two = IndexedDataset(tmp_path / "two")
    two.check()
    assert len(two) == 2 * len(ds) and two.num_documents == 2 * ds.num_documents
    assert np.array_equal(two[len(ds) + 3], ds[3]) and list(two.doc_idx[-2:]) == [2 * len(ds) - 1, 2 * len(ds)]
