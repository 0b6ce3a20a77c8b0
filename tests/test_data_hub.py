"""Datasets on the Hub by id (against tests/hub_stub.py on 127.0.0.1): a batch downloads the index and only the shard
that holds it, each file sha256-checked; inspect downloads the index alone; a corrupt shard is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hub_stub import HubStub

from neox_jax.cli import main
from neox_jax.data import files, pythia_batch, write_indexed

REPO = "EleutherAI/tiny-pythia-preshuffled"
SEQ, BATCH = 9, 4  # 4 steps of 4 sequences of 9 uint16 tokens: 288 bytes in 4 shards of 72 (one step each)


@pytest.fixture()
def stub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    rng = np.random.default_rng(0)
    local = write_indexed(tmp_path / "document", [rng.integers(0, 60000, SEQ) for _ in range(4 * BATCH)], np.uint16)
    files.shard(tmp_path / "document", tmp_path / "repo", shard_bytes=BATCH * SEQ * 2, progress=False)
    (tmp_path / "repo" / "document.sha256").unlink()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStub({REPO: {"main": tmp_path / "repo"}}) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        yield s, local


def _gets(s) -> list[str]:
    return sorted({r.rsplit("/", 1)[-1] for r in s.requests if r.startswith("GET /datasets/")})


def test_batch_downloads_only_its_shard(stub, tmp_path, capsys):
    s, local = stub
    rc = main(["data", "batch", REPO, "--step", "2", "--batch-size", str(BATCH), "--seq-len", str(SEQ),
               "--out", str(tmp_path / "b.npy")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), pythia_batch(local, 2, BATCH, SEQ))
    assert _gets(s) == ["document-00002-of-00003.bin", "document.idx"]
    s.requests.clear()
    assert main(["data", "inspect", REPO, "--json", "--no-hash"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["items"], info["tokens"], info["dtype"]) == (4 * BATCH, 4 * BATCH * SEQ, "uint16")
    assert [f.get("present", True) for f in info["files"]] == [True, False, False, True, False]
    assert _gets(s) == []  # the index is in the cache already


def test_corrupt_shard_is_refused(stub, tmp_path, capsys):
    s, _ = stub
    s.corrupt.add((REPO, "document-00001-of-00003.bin"))
    rc = main(["data", "batch", REPO, "--step", "1", "--batch-size", str(BATCH), "--seq-len", str(SEQ),
               "--out", str(tmp_path / "b.npy")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "document-00001-of-00003.bin: sha256 " in err and "the Hub's is" in err
    assert not (tmp_path / "b.npy").exists()
