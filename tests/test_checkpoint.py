"""Checkpoint layout, validation on restore, and crash safety."""

import json
import shutil

import jax
import numpy as np
import pytest

from neox_jax.model.config import preset
from neox_jax.model.neox import init_params
from neox_jax.store import checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = preset("tiny")
    params = init_params(cfg, seed=3)
    out = checkpoint.save_params(tmp_path_factory.mktemp("ck") / "c", cfg, params, source={"kind": "test"})
    return cfg, params, out


def test_round_trip_exact(saved):
    cfg, params, out = saved
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["config"] == cfg.to_dict() and meta["dtype"] == "float32" and meta["format_version"] == 1
    restored = checkpoint.restore_params(out)
    jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_relative_path(saved, monkeypatch):
    """Orbax reads no item metadata from a relative directory: the loader must not depend on the working directory."""
    _, params, out = saved
    monkeypatch.chdir(out.parent)
    jax.tree.map(np.testing.assert_array_equal, checkpoint.restore_params(out.name), params)


def test_restore_casts_dtype(saved):
    _, _, out = saved
    restored = checkpoint.restore_params(out, dtype="bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves(restored)} == {"bfloat16"}


def test_shape_mismatch_is_named(saved, tmp_path):
    cfg, params, out = saved
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    meta["config"]["intermediate_size"] = 128  # the stored arrays say 256
    (bad / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"layers\.0.*\['mlp'\]\['dense_h_to_4h'\]\['kernel'\]: expected shape \(64, 128\)",
    ):
        checkpoint.restore_params(bad)


def test_missing_group_is_named(saved, tmp_path):
    _, _, out = saved
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shutil.rmtree(bad / "params" / "layers.1")
    with pytest.raises(checkpoint.CheckpointError, match=r"layers\.1: missing parameter group"):
        checkpoint.restore_params(bad)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a neox-jax checkpoint"):
        checkpoint.read_metadata(tmp_path)


def test_crash_mid_write_leaves_nothing(tmp_path):
    cfg = preset("tiny")
    params = init_params(cfg)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with checkpoint.CheckpointWriter(out, cfg, "float32") as w:
            w.write_group("embed_in", jax.tree.map(np.asarray, params["embed_in"]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # an incomplete writer refuses to finish
    with checkpoint.CheckpointWriter(out, cfg, "float32") as w:
        w.write_group("embed_in", jax.tree.map(np.asarray, params["embed_in"]))
        with pytest.raises(checkpoint.CheckpointError, match="groups never written"):
            w.finish()
    assert list(tmp_path.iterdir()) == []
