"""Hub id + revision -> verified, recorded conversion, against a loopback stand-in for the Hub (tests/hub_stub.py).
No test touches the real network: HF_ENDPOINT points at the stub, HF_HUB_CACHE / NEOX_JAX_CACHE at tmp_path."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re

import numpy as np
import pytest
from hub_stub import HubStub

from conftest import hf_logits, make_hf_model

REPO = "EleutherAI/pythia-tiny"
IDS = np.array([[3, 17, 90, 5, 44, 101, 7, 63]])


@pytest.fixture(scope="module")
def revisions(tmp_path_factory):
    """{revision: (hf model, save_pretrained dir)}: two different random models as step0 and step1000."""
    out = {}
    for seed, rev in enumerate(("step0", "step1000")):
        model = make_hf_model(seed=seed)
        d = tmp_path_factory.mktemp(rev)
        model.save_pretrained(d)
        out[rev] = (model, d)
    return out


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """Empty caches under tmp_path, online, no token; huggingface_hub's import-time offline flag overridden too."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("NEOX_JAX_CACHE", str(tmp_path / "neox"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path


@pytest.fixture
def stub(revisions, hub_env, monkeypatch):
    with HubStub({REPO: {rev: d for rev, (_, d) in revisions.items()}}) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        yield s


def convert_cli(*args):
    from neox_jax.cli import main

    return main(["convert", "hf", *map(str, args), "--quiet"])


def test_pythia_steps_and_ids():
    from neox_jax.store.hub import nearest_steps, pythia_model_ids, pythia_steps, step_of

    steps = pythia_steps()
    assert len(steps) == 154 and steps[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert steps[-1] == 143000 and len(set(steps)) == 154 and steps == sorted(steps)
    assert nearest_steps(1234) == [1000, 2000] and nearest_steps(3) == [2, 4]
    assert step_of("step143000") == 143000 and step_of("main") is None
    ids = pythia_model_ids()
    assert "EleutherAI/pythia-160m-deduped" in ids and "EleutherAI/gpt-neox-20b" in ids and len(ids) == 17


def test_settings_read_at_call_time(monkeypatch, tmp_path):
    from neox_jax.store.hub import Settings

    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = Settings.from_env()
    assert (s.cache_dir, s.token, s.endpoint, s.offline) == (
        tmp_path / "home" / "hub",
        "hf_secret",
        "http://127.0.0.1:9",
        True,
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert Settings.from_env().cache_dir == tmp_path / "c"


def test_two_revisions_convert_to_their_own_logits(stub, revisions, hub_env):
    import neox_jax

    for rev, (model, _) in revisions.items():
        out = hub_env / f"ckpt-{rev}"
        assert convert_cli(REPO, out, "--revision", rev) == 0
        np.testing.assert_allclose(neox_jax.load(out).logits(IDS), hf_logits(model, IDS), atol=2e-4, rtol=1e-4)
        src = json.loads((out / "metadata.json").read_text())["source"]
        assert src["repo_id"] == REPO and src["revision"] == rev and src["commit"] == stub.commit(REPO, rev)
        st = revisions[rev][1] / "model.safetensors"
        assert src["sha256"]["model.safetensors"] == hashlib.sha256(st.read_bytes()).hexdigest()
    # only what conversion needs was fetched, and by commit (not by the moving branch name)
    gets = [r for r in stub.requests if r.startswith("GET /") and "/resolve/" in r]
    assert not any("generation_config" in r for r in gets)
    assert all(stub.commit(REPO, "step0") in r or stub.commit(REPO, "step1000") in r for r in gets)


def test_corrupt_download_refused_and_removed(stub, hub_env, capsys):
    stub.corrupt.add((REPO, "model.safetensors"))
    out = hub_env / "ckpt"
    assert convert_cli(REPO, out, "--revision", "step0") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "refused" in err[0]
    shas = re.findall(r"\b[0-9a-f]{64}\b", err[0])
    assert len(shas) == 3 and shas[0] != shas[1]  # ours, the Hub's, and the removed blob named by the Hub's
    assert not out.exists() and not any(p.name.startswith("ckpt") for p in hub_env.iterdir())
    blobs = hub_env / "hf" / f"models--{REPO.replace('/', '--')}" / "blobs"
    assert shas[1] not in {p.name for p in blobs.iterdir()}
    stub.corrupt.clear()  # a retry downloads it again and succeeds
    assert convert_cli(REPO, out, "--revision", "step0") == 0 and (out / "metadata.json").is_file()


def test_errors_are_named(stub, hub_env, monkeypatch):
    from neox_jax.store import hub

    with pytest.raises(hub.HubError, match=r"no revision 'step1234'; nearest published steps: step1000, step2000"):
        hub.fetch(REPO, "step1234")
    with pytest.raises(hub.HubError, match=r"unknown repo EleutherAI/nope .*HF_TOKEN"):
        hub.fetch("EleutherAI/nope", "step0")
    stub.gated.add(REPO)
    with pytest.raises(hub.HubError, match=r"gated.*set HF_TOKEN"):
        hub.fetch(REPO, "step0")
    monkeypatch.setenv("HF_TOKEN", stub.token)  # read when called: the token reaches every request
    assert hub.fetch(REPO, "step0").resolved.commit == stub.commit(REPO, "step0")


def test_not_gpt_neox_refused_before_weights(stub, hub_env, tmp_path):
    from neox_jax.store import hub

    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    stub.add_repo("someone/llama-tiny", {"main": d})
    with pytest.raises(hub.HubError, match=r"someone/llama-tiny@main is a 'llama' model, not GPT-NeoX"):
        hub.fetch("someone/llama-tiny")
    assert not any("/resolve/" in r for r in stub.requests)


def test_disk_full_named(stub, hub_env, monkeypatch):
    import huggingface_hub

    from neox_jax.store import hub

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", full)
    with pytest.raises(hub.HubError, match=r"disk full while downloading EleutherAI/pythia-tiny@step0 config.json"):
        hub.fetch(REPO, "step0")


def test_offline_from_prefilled_cache(stub, revisions, hub_env, monkeypatch):
    from neox_jax.store import hub

    online = hub.fetch(REPO, "step1000")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(stub.requests)
    offline = hub.fetch(REPO, "step1000")
    assert len(stub.requests) == n, "offline mode made a request"
    assert offline.resolved.offline and offline.resolved.commit == stub.commit(REPO, "step1000")
    assert offline.sha256 == online.sha256 and offline.path == online.path
    with pytest.raises(hub.HubError, match=r"offline \(HF_HUB_OFFLINE=1\), and EleutherAI/pythia-tiny@step0 is not"):
        hub.fetch(REPO, "step0")
    # online but the Hub out of reach (a closed loopback port): the same, from the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert hub.fetch(REPO, "step1000").sha256 == online.sha256
    with pytest.raises(hub.HubError, match=r"cannot reach http://127.0.0.1:9 .*pythia-tiny@step0 is not in the"):
        hub.fetch(REPO, "step0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a cache filled by another tool (no neox-jax record): refs + blob names still resolve and verify it
    for f in (hub_env / "neox" / "hub").iterdir():
        f.unlink()
    folder = hub_env / "hf" / f"models--{REPO.replace('/', '--')}"
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "step1000").write_text(stub.commit(REPO, "step1000"))
    assert hub.fetch(REPO, "step1000").sha256 == online.sha256
    # a blob damaged on disk after download is refused offline too
    blob = os.path.realpath(online.path / "model.safetensors")
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as fh:
        fh.write(b"\xff\xff")
    with pytest.raises(hub.HubError, match=r"model.safetensors: sha256 .* the Hub's is"):
        hub.fetch(REPO, "step1000")
    assert not os.path.exists(blob)


def test_load_by_hub_id_converts_once(stub, revisions, hub_env, monkeypatch):
    import neox_jax

    model, _ = revisions["step1000"]
    m = neox_jax.load(REPO, revision="step1000", dtype="float32")
    np.testing.assert_allclose(m.logits(IDS), hf_logits(model, IDS), atol=2e-4, rtol=1e-4)
    commit = stub.commit(REPO, "step1000")
    assert m.path.endswith(f"{commit}-float32")
    meta = json.loads((hub_env / m.path / "metadata.json").read_text())
    assert meta["source"]["commit"] == commit and meta["dtype"] == "float32"
    n = len(stub.requests)
    again = neox_jax.load(REPO, revision="step1000", dtype="float32")  # from the cache: only the resolve request
    assert again.path == m.path and stub.requests[n:] == [f"GET /api/models/{REPO}/revision/step1000"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert neox_jax.load(REPO, revision="step1000").path == m.path and len(stub.requests) == n + 1


def test_killed_conversion_leaves_no_cache_entry(stub, hub_env, monkeypatch):
    import neox_jax
    from neox_jax.store import converters
    from neox_jax.store.checkpoint import CheckpointWriter

    def killed(self, group, tree):
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointWriter, "write_group", killed)
    with pytest.raises(KeyboardInterrupt):
        neox_jax.load(REPO, revision="step0")
    entry = converters.module("hub").cache_entry(REPO, stub.commit(REPO, "step0"), "float32")
    assert not entry.exists() and list(entry.parent.iterdir()) == []


def test_revision_with_local_dir_refused(revisions, tmp_path):
    from neox_jax.errors import NeoXError
    from neox_jax.store import converters

    with pytest.raises(NeoXError, match="is a local directory, not a hub id"):
        converters.module("hub").convert_source(revisions["step0"][1], tmp_path / "x", revision="step0")
