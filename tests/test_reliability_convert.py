"""Convert faults: the shard index must match the shards; stale temporary directories of dead runs are removed (live
ones kept); SIGTERM and SIGKILL mid-convert; disk full; the output appearing meanwhile (docs/reliability.md)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, make_hf_model, micro_config
from neox_jax.errors import NeoXError
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import init_params
from neox_jax.store import checkpoint, staging

CFG = micro_config()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny HF model saved as several safetensors shards with model.safetensors.index.json."""
    d = tmp_path_factory.mktemp("hf_sharded")
    make_hf_model(num_hidden_layers=1).save_pretrained(d, max_shard_size="60KB")
    assert len(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]) > 5
    return d


@pytest.fixture
def src(sharded, tmp_path):
    return shutil.copytree(sharded, tmp_path / "src")


def _index(src):
    return json.loads((src / "model.safetensors.index.json").read_text())


def _write_index(src, index):
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _convert(src, out):
    from convert.hf import convert_hf

    return convert_hf(src, out, progress=False)


def test_sharded_source_converts(src, tmp_path):
    """Every tensor of every shard lands in the checkpoint: the logits equal transformers' on the sharded source."""
    import numpy as np
    import torch
    from transformers import GPTNeoXForCausalLM

    import neox_jax

    out = _convert(src, tmp_path / "out")["out"]
    ids = np.array([[3, 17, 42, 5, 9, 60, 2, 11]])
    ours = neox_jax.load(out).logits(ids)
    with torch.no_grad():
        ref = GPTNeoXForCausalLM.from_pretrained(src).eval()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_tensor_in_two_shards_is_refused(src, tmp_path):
    from safetensors.numpy import load_file, save_file

    index = _index(src)
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    second = load_file(src / shards[1])
    second[name] = load_file(src / shards[0])[name] * 2  # the later file would silently win
    save_file(second, src / shards[1])
    with pytest.raises(NeoXError, match=rf"tensor {name} is stored in two shards, {shards[0]} and {shards[1]}"):
        _convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_index_entry_no_shard_holds_is_refused(src, tmp_path):
    index = _index(src)
    index["weight_map"]["gpt_neox.layers.7.mlp.dense_4h_to_h.bias"] = min(index["weight_map"].values())
    _write_index(src, index)
    with pytest.raises(NeoXError, match=r"lists 1 tensor\(s\) that no shard holds.*layers\.7\.mlp"):
        _convert(src, tmp_path / "out")


@pytest.mark.parametrize("how", ["unlisted", "other shard"])
def test_shard_holding_what_the_index_puts_elsewhere_is_refused(src, tmp_path, how):
    index = _index(src)
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    if how == "unlisted":
        del index["weight_map"][name]
        match = rf"{shards[0]}: holds tensor {name}, but model.safetensors.index.json does not list it"
    else:
        index["weight_map"][name] = shards[1]
        match = rf"{shards[0]}: holds tensor {name}, but model.safetensors.index.json names {shards[1]}"
    _write_index(src, index)
    with pytest.raises(NeoXError, match=match):
        _convert(src, tmp_path / "out")


def _owner(tmp, pid, start=None):
    tmp.mkdir()
    (tmp / staging.OWNER).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "start": start}))


def test_stale_tmp_dirs_of_dead_runs_are_removed_live_ones_kept(tmp_path, capsys):
    out = tmp_path / "ck"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _owner(tmp_path / "ck.tmp-dead0000", dead.pid)
    _owner(tmp_path / "ck.tmp-reused00", os.getpid(), start="1")  # our pid, but another process's start time
    _owner(tmp_path / "ck.tmp-alive000", os.getpid(), start=staging._start_time(os.getpid()))
    (tmp_path / "ck.tmp-legacy00").mkdir()  # no owner record (an older writer): left, named
    checkpoint.save_params(out, CFG, init_params(CFG))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["ck", "ck.tmp-alive000", "ck.tmp-legacy00"]
    err = capsys.readouterr().err
    assert "removed" in err and "ck.tmp-dead0000" in err and "still running" in err and "no owner record" in err


SLOW_CONVERT = """
import sys, time
from neox_jax.store import checkpoint
original = checkpoint.CheckpointWriter.write_group
def slow(self, name, tree):
    original(self, name, tree)
    print("wrote", name, flush=True)
    time.sleep(60)
checkpoint.CheckpointWriter.write_group = slow
from convert.__main__ import main
sys.exit(main(["hf", sys.argv[1], sys.argv[2], "--quiet"]))
"""


def _start_slow_convert(src, out):
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_CONVERT), str(src), str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline()  # blocks until the first group is on disk
    assert line.startswith("wrote"), (line, p.stderr.read() if p.poll() is not None else "")
    return p


def test_sigterm_mid_convert_removes_its_tmp_dir(src, tmp_path):
    out = tmp_path / "out"
    p = _start_slow_convert(src, out)
    assert len(list(tmp_path.glob("out.tmp-*"))) == 1
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "terminated: removed the partial checkpoint" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_sigkill_mid_convert_leaves_a_tmp_dir_the_next_run_removes(src, tmp_path, capsys):
    out = tmp_path / "out"
    p = _start_slow_convert(src, out)
    p.kill()
    p.communicate(timeout=60)
    (stale,) = tmp_path.glob("out.tmp-*")
    assert json.loads((stale / staging.OWNER).read_text())["pid"] == p.pid
    _convert(src, out)
    assert out.is_dir() and not stale.exists()
    assert f"removed {stale}" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["empty dir", "file in dir"])
def test_output_appearing_during_convert_is_one_error(src, tmp_path, monkeypatch, what):
    out = tmp_path / "out"
    original = checkpoint.CheckpointWriter.write_group

    def racing(self, name, tree):
        original(self, name, tree)
        if name == "embed_in":  # another process creates OUT while we convert
            out.mkdir()
            if what == "file in dir":
                (out / "theirs.txt").write_text("keep me")

    monkeypatch.setattr(checkpoint.CheckpointWriter, "write_group", racing)
    with pytest.raises(NeoXError, match="appeared while the checkpoint was being written") as e:
        _convert(src, out)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ([] if what == "empty dir" else ["theirs.txt"])
    assert not list(tmp_path.glob("out.tmp-*"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (needs root and mount); skipped with the reason where it cannot be mounted."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("disk-full tests mount a 1 MB tmpfs, which needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True, check=False
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", str(d)], check=True)


BIG = NeoXConfig(
    vocab_size=2048,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=256,
    max_position_embeddings=32,
)  # about 2.5 MB of float32: does not fit in 1 MB


def test_disk_full_is_one_line_and_removes_tmp(small_disk):
    full = r"disk full: group embed_in needs up to 2\.1 MB while it is written, 1\.0\d MB"
    with pytest.raises(NeoXError, match=full) as e:
        checkpoint.save_params(small_disk / "ck", BIG, init_params(BIG))
    assert "\n" not in str(e.value)
    assert list(small_disk.iterdir()) == []


def test_disk_full_inside_orbax_is_one_line_and_removes_tmp(small_disk, monkeypatch, capfd):
    """Without the free-space check (another writer filling the disk meanwhile), TensorStore's RESOURCE_EXHAUSTED
    from inside Orbax becomes the same one-line error, and its thread tracebacks are not printed."""
    monkeypatch.setattr(staging.Staging, "check_space", lambda *a: None)
    with pytest.raises(NeoXError, match=r"disk full while writing the checkpoint"):
        checkpoint.save_params(small_disk / "ck", BIG, init_params(BIG))
    assert list(small_disk.iterdir()) == []
    assert "Traceback" not in capfd.readouterr().err


def test_disk_full_through_the_convert_command(src, small_disk, capsys):
    from convert.__main__ import main

    (small_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 60 * 1024))  # less free space than one layer
    assert main(["hf", str(src), str(small_disk / "out"), "--quiet"]) == 1
    err = "\n".join(
        ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("warning: ")
    )  # the reference has no tokenizer.json: one warning line
    assert len(err.splitlines()) == 1 and "disk full" in err and "Traceback" not in err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
