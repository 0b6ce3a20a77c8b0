"""Sharded inference on 8 (fake CPU) devices: restore straight onto a mesh, logits equal to one device, shardings as the
rules say, clear errors for sizes that cannot split, two processes forming one mesh, and 20B's per-device bytes."""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import neox_jax
from neox_jax import checkpoint, sharding
from neox_jax.config import preset
from neox_jax.model import init_params

from conftest import run_cli

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason=(
    f"needs 8 devices, found {jax.device_count()}: run with XLA_FLAGS=--xla_force_host_platform_device_count=8"))

MESHES = ["data=1,model=8", "data=2,model=4", "data=4,model=2", "data=8,model=1"]
# heads, mlp and vocab all divide by 8; head_dim 8, rotary_dims 2
CFG = preset("tiny").replace(num_attention_heads=8, vocab_size=128, max_position_embeddings=64)


@pytest.fixture(scope="session")
def mesh_ckpt(tmp_path_factory):
    """A float32 checkpoint of random weights, every tensor (biases and layernorms too) perturbed so each matters."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                          init_params(CFG, seed=1))
    return checkpoint.save_params(tmp_path_factory.mktemp("mesh") / "ckpt", CFG, params)


@pytest.fixture(scope="session")
def batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, CFG.vocab_size, (8, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[5, :1] = 0
    return ids, mask


@pytest.fixture(scope="session")
def ref_logits(mesh_ckpt, batch):
    return neox_jax.load(mesh_ckpt).logits(*batch)


@pytest.mark.parametrize("spec", MESHES)
def test_logits_on_mesh_equal_one_device(mesh_ckpt, batch, ref_logits, spec):
    model = neox_jax.load(mesh_ckpt, mesh=sharding.make_mesh(spec))
    assert model.mesh is not None and dict(model.mesh.shape) == sharding.parse_mesh_spec(spec, 8)
    np.testing.assert_allclose(model.logits(*batch), ref_logits, atol=1e-5, rtol=0)


def test_restored_shardings_follow_rules(mesh_ckpt):
    model = neox_jax.load(mesh_ckpt, mesh=sharding.make_mesh("data=2,model=4"))
    p = model.params
    d, n, h, f, v = CFG.hidden_size, CFG.num_attention_heads, CFG.head_dim, CFG.intermediate_size, CFG.vocab_size
    layer = p["layers"][1]
    expected = {  # array: (spec, shape of one device's shard)
        "qkv kernel": (layer["attention"]["query_key_value"]["kernel"], P(None, "model", None, None), (d, n // 4, 3, h)),
        "qkv bias": (layer["attention"]["query_key_value"]["bias"], P("model", None, None), (n // 4, 3, h)),
        "dense kernel": (layer["attention"]["dense"]["kernel"], P("model", None, None), (n // 4, h, d)),
        "dense bias": (layer["attention"]["dense"]["bias"], P(None), (d,)),
        "h_to_4h kernel": (layer["mlp"]["dense_h_to_4h"]["kernel"], P(None, "model"), (d, f // 4)),
        "h_to_4h bias": (layer["mlp"]["dense_h_to_4h"]["bias"], P("model"), (f // 4,)),
        "4h_to_h kernel": (layer["mlp"]["dense_4h_to_h"]["kernel"], P("model", None), (f // 4, d)),
        "layernorm": (layer["input_layernorm"]["weight"], P(None), (d,)),
        "embed_in": (p["embed_in"]["embedding"], P("model", None), (v // 4, d)),
        "embed_out": (p["embed_out"]["kernel"], P(None, "model"), (d, v // 4)),
    }
    for name, (x, spec, shard) in expected.items():
        assert x.sharding.mesh.shape == model.mesh.shape, name
        assert x.sharding.spec == spec, f"{name}: {x.sharding.spec} != {spec}"
        assert {s.data.shape for s in x.addressable_shards} == {shard}, name
        assert len(x.addressable_shards) == 8, name
    # each device holds exactly the slice the spec names, restored from the checkpoint (not zeros, not the whole)
    full = np.asarray(p["layers"][1]["attention"]["query_key_value"]["kernel"])
    for s in layer["attention"]["query_key_value"]["kernel"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), full[s.index])


def test_restore_with_dtype_on_mesh(mesh_ckpt):
    model = neox_jax.load(mesh_ckpt, dtype="bfloat16", mesh=sharding.make_mesh("data=2,model=4"))
    assert {x.dtype.name for x in jax.tree.leaves(model.params)} == {"bfloat16"}
    assert model.params["embed_out"]["kernel"].sharding.spec == P(None, "model")


def test_model_that_cannot_split_names_the_sizes_that_work():
    cfg = CFG.replace(num_attention_heads=4)  # 4 heads over model=8
    with pytest.raises(ValueError, match=r"num_attention_heads=4 not divisible by 8.*work on 8 devices: \[1, 2, 4\]"):
        sharding.param_shardings(cfg, sharding.make_mesh("model=8"))


def test_vocab_that_cannot_split_names_the_sizes_that_work():
    cfg_bad_vocab = CFG.replace(vocab_size=100)  # 100 % 8 != 0
    with pytest.raises(ValueError, match=r"vocab_size=100 not divisible by 8.*\[1, 2, 4\]"):
        sharding.check_divisible(cfg_bad_vocab, sharding.make_mesh("model=8"))


def test_batch_that_cannot_split_suggests_sizes(mesh_ckpt, batch):
    model = neox_jax.load(mesh_ckpt, mesh=sharding.make_mesh("data=4,model=2"))
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by the mesh's data=4.*multiple of 4 "
                                         r"\(e\.g\. \[4, 8, 12\]\).*data in \[1, 2\]"):
        model.logits(batch[0][:6])


def test_bad_mesh_spec():
    with pytest.raises(ValueError, match="needs 6 devices, but 8"):
        sharding.make_mesh("data=3,model=2")


def test_neox_20b_per_device_bytes_over_model_8():
    """jax.eval_shape of the 20B preset placed by the rules over model=8: each device holds ~1/8 of the 41 GB."""
    cfg = preset("neox-20b")
    total = cfg.num_params * 2  # float16
    assert 40.5e9 < total < 41.5e9
    per_device = sharding.param_bytes_per_device(cfg, sharding.make_mesh("model=8"), "float16")
    replicated = cfg.num_hidden_layers * 6 * cfg.hidden_size * 2 + 2 * cfg.hidden_size * 2  # norms, row biases
    assert per_device == pytest.approx((total - replicated) / 8 + replicated, rel=1e-9)
    assert per_device == pytest.approx(total / 8, rel=0.01)
    # the device-free plan agrees with the real mesh
    assert sharding.param_bytes_per_device(cfg, sharding.abstract_mesh({"model": 8}), "float16") == per_device


def test_kv_cache_bytes_split_over_batch_and_heads():
    cfg = preset("neox-20b")
    full = 2 * cfg.num_hidden_layers * 4 * 2048 * cfg.hidden_size * 2
    got = sharding.kv_cache_bytes_per_device(cfg, sharding.abstract_mesh({"data": 2, "model": 4}), 4, 2048)
    assert got == full / 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_form_one_mesh(mesh_ckpt, tmp_path):
    """Two processes on localhost, 4 CPU devices each, gloo collectives: one 8-device mesh, the same logits as here."""
    ids = np.random.default_rng(2).integers(0, CFG.vocab_size, (8, 10))
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "logits.npz"
    port = _free_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    meshes = ["data=2,model=4", "data=1,model=8"]  # data across the processes; model across the processes

    def one(i):
        return run_cli("tests/distributed_worker.py", mesh_ckpt, *[a for m in meshes for a in ("--mesh", m)],
                       "--ids", tmp_path / "ids.npy", "--out", out, "--coordinator", f"127.0.0.1:{port}",
                       "--num-processes", 2, "--process-id", i, "--init-timeout", 60,
                       env=env, timeout=240, check=False)

    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(one, [0, 1]))
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i} failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}"
        assert f"process {i}/2: 4 local of 8 devices" in r.stdout
    assert "wrote" in results[0].stdout and "wrote" not in results[1].stdout  # only process 0 writes
    ref = neox_jax.load(mesh_ckpt).logits(ids)
    got = np.load(out)
    for m in meshes:
        np.testing.assert_allclose(got[m], ref, atol=1e-5, rtol=0, err_msg=m)
