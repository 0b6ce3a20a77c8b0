"""Sharded inference on 8 (fake CPU) devices: restore straight onto a mesh, logits and greedy generation equal to one
device, shardings as the rules say (params and KV cache), clear errors for sizes that cannot split, two processes
forming one mesh (logits, and scripts/generate.py with the multi-host flags), and 20B's per-device bytes."""

from __future__ import annotations

import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import neox_jax
from conftest import run_cli
from neox_jax.model.config import preset
from neox_jax.model.neox import init_params
from neox_jax.parallel import distributed, sharding
from neox_jax.store import checkpoint

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason=(
        f"needs 8 devices, found {jax.device_count()}: run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    ),
)

MESHES = ["data=1,model=8", "data=2,model=4", "data=4,model=2", "data=8,model=1"]
# heads, mlp and vocab all divide by 8; head_dim 8, rotary_dims 2; vocab 320 > the tokenizer's 300 ids
CFG = preset("tiny").replace(num_attention_heads=8, vocab_size=320, max_position_embeddings=128)
PROMPTS = [[5, 17, 99, 200, 42, 7, 8], [61, 3], [250, 251, 252, 9, 10, 11, 12, 13, 14, 15, 16, 18]]


@pytest.fixture(scope="session")
def mesh_ckpt(tmp_path_factory, bpe_tokenizer):
    """A float32 checkpoint of random weights, every tensor (biases and layernorms too) perturbed so each matters,
    with a byte-level tokenizer."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), init_params(CFG, seed=1)
    )
    d = tmp_path_factory.mktemp("mesh")
    return checkpoint.save_params(d / "ckpt", CFG, params, tokenizer_file=bpe_tokenizer)


@pytest.fixture(scope="session")
def one_device(mesh_ckpt):
    return neox_jax.load(mesh_ckpt)


@pytest.fixture(scope="session")
def batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, CFG.vocab_size, (8, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[5, :1] = 0
    return ids, mask


@pytest.fixture(scope="session")
def ref_logits(one_device, batch):
    return one_device.logits(*batch)


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
    qkv = layer["attention"]["query_key_value"]
    expected = {  # array: (spec, shape of one device's shard)
        "qkv kernel": (qkv["kernel"], P(None, "model", None, None), (d, n // 4, 3, h)),
        "qkv bias": (qkv["bias"], P("model", None, None), (n // 4, 3, h)),
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
    full = np.asarray(qkv["kernel"])
    for s in qkv["kernel"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), full[s.index])


@pytest.mark.parametrize("spec", ["data=2,model=4", "data=1,model=8", "data=8,model=1"])
def test_greedy_generation_on_mesh_equals_one_device(mesh_ckpt, one_device, spec):
    model = neox_jax.load(mesh_ckpt, mesh=sharding.make_mesh(spec))
    want = one_device.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
    got = model.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])  # 3 prompts: batch bucket 4, or 8 for data=8
    assert got.token_ids == want.token_ids
    # the KV cache the compiled programs return is split over batch (data) and heads (model)
    sizes = sharding.parse_mesh_spec(spec, 8)
    # [B, N, S, H]
    expect = P("data" if sizes["data"] > 1 else None, "model" if sizes["model"] > 1 else None, None, None)
    programs = model.generator().programs.values()
    prefill_state, (decode_state, *_) = programs[0].output_shardings, programs[1].output_shardings
    for state in (prefill_state, decode_state):
        for buf in state.cache["k"] + state.cache["v"]:
            assert _norm(buf.spec) == _norm(expect), (buf.spec, expect)


def _norm(spec) -> tuple:
    """A PartitionSpec as a tuple without trailing Nones (P('data', None) and P('data') mean the same)."""
    t = tuple(spec)
    while t and t[-1] is None:
        t = t[:-1]
    return t


def test_sampled_generation_on_mesh_equals_one_device(mesh_ckpt, one_device):
    model = neox_jax.load(mesh_ckpt, mesh=sharding.make_mesh("data=2,model=4"))
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5, stop_token_ids=[])
    assert model.generate(PROMPTS[:1], **kw).token_ids == one_device.generate(PROMPTS[:1], **kw).token_ids


def test_restore_with_dtype_on_mesh(mesh_ckpt):
    model = neox_jax.load(mesh_ckpt, dtype="bfloat16", mesh=sharding.make_mesh("data=2,model=4"))
    assert {x.dtype.name for x in jax.tree.leaves(model.params)} == {"bfloat16"}
    assert model.params["embed_out"]["kernel"].sharding.spec == P(None, "model")


def test_model_that_cannot_split_names_the_sizes_that_work():
    cfg = CFG.replace(num_attention_heads=4)  # 4 heads over model=8
    with pytest.raises(ValueError, match=r"num_attention_heads=4 not divisible by 8.*work on 8 devices: \[1, 2, 4\]"):
        sharding.param_shardings(cfg, sharding.make_mesh("model=8"))


def test_vocab_that_cannot_split_names_the_sizes_that_work():
    cfg_bad_vocab = CFG.replace(vocab_size=300)  # 300 % 8 != 0
    with pytest.raises(ValueError, match=r"vocab_size=300 not divisible by 8.*\[1, 2, 4\]"):
        sharding.check_divisible(cfg_bad_vocab, sharding.make_mesh("model=8"))


def test_batch_that_cannot_split_suggests_sizes(mesh_ckpt, batch):
    model = neox_jax.load(mesh_ckpt, mesh=sharding.make_mesh("data=4,model=2"))
    with pytest.raises(
        ValueError,
        match=r"batch size 6 is not divisible by the mesh's data=4.*multiple of 4 "
        r"\(e\.g\. \[4, 8, 12\]\).*data in \[1, 2\]",
    ):
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


def test_kv_cache_bytes_length_need_not_divide_the_model_axis():
    """The cache is [B, N, S, H]: heads split over model, the length S never (a length of 7 on model=4 is fine)."""
    cfg = preset("neox-20b")
    got = sharding.kv_cache_bytes_per_device(cfg, sharding.abstract_mesh({"data": 1, "model": 4}), 2, 7)
    assert got == 2 * cfg.num_hidden_layers * 2 * 7 * (cfg.num_attention_heads // 4) * cfg.head_dim * 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_processes=2, process_id=0), "need --coordinator"),
        (dict(coordinator="localhost", num_processes=2, process_id=0), "expected HOST:PORT"),
        (dict(coordinator="127.0.0.1:1234", num_processes=2), "both --num-processes and --process-id"),
        (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), r"must be in \[0, 2\)"),
    ],
)
def test_distributed_flags_checked_before_starting(kwargs, match, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)
    assert distributed.initialize() is False  # no flags, no environment: a plain single-process run


# gloo (JAX's CPU collectives) prints its connection messages to stdout itself, in pieces, from several threads; the
# pieces and the numbers between them can land anywhere, even as a line of just "1"
GLOO_PIECES = ("[Gloo] Rank", "is connected to", "peer ranks. Expected number of connected peer ranks is :")


def _without_gloo(stdout: str) -> str:
    for piece in GLOO_PIECES:
        stdout = stdout.replace(piece, "")
    return stdout


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
        return run_cli(
            "tests/distributed_worker.py",
            mesh_ckpt,
            *[a for m in meshes for a in ("--mesh", m)],
            "--ids",
            tmp_path / "ids.npy",
            "--out",
            out,
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            2,
            "--process-id",
            i,
            "--init-timeout",
            60,
            env=env,
            timeout=240,
            check=False,
        )

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


def test_two_processes_generate_cli(mesh_ckpt, one_device):
    """scripts/generate.py with --mesh and the multi-host flags on two processes: process 0 prints the JSON (the same
    greedy tokens as one device), process 1 prints nothing."""
    port = _free_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    prompts = ["Hello", "The quick"]

    def one(i):
        return run_cli(
            "scripts/generate.py",
            "--checkpoint",
            mesh_ckpt,
            "--prompt",
            prompts[0],
            "--prompt",
            prompts[1],
            "--max-new-tokens",
            6,
            "--ignore-eos",
            "--json",
            "--no-compile-cache",
            "--mesh",
            "data=2,model=4",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            2,
            "--process-id",
            i,
            "--init-timeout",
            60,
            env=env,
            timeout=240,
            check=False,
        )

    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(one, [0, 1]))
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i} failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}"
    assert not re.sub(r"\d+", "", _without_gloo(results[1].stdout)).strip()  # nothing but gloo's numbers
    text = _without_gloo(results[0].stdout)
    out = json.loads(text[text.index("{") : text.rindex("}") + 1])
    want = one_device.generate(prompts, max_new_tokens=6, stop_token_ids=[])
    assert [c["token_ids"] for c in out["completions"]] == want.token_ids
    assert [c["text"] for c in out["completions"]] == want.texts
