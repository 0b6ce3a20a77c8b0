"""int8 / LLM.int8 inference: the matmul against a plain NumPy reference, quantized logits against float32, the
outlier decomposition on injected outlier features, greedy generation, int8 checkpoints through Orbax, sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neox_jax
from conftest import run_cli
from neox_jax.api import NeoX
from neox_jax.cli import main
from neox_jax.model import quantize as Q
from neox_jax.model.neox import abstract_params

# ---- plain NumPy reference of the algorithm (2-D: x [M, K], W [K, O]) ---------------------------------------------


def _inv127(absmax):
    return np.where(absmax > 0, np.float32(127) / np.where(absmax > 0, absmax, 1), 0).astype(np.float32)


def np_quantize_weight(w):
    absmax = np.abs(w).max(0)
    return np.round(w * _inv127(absmax)).astype(np.int8), (absmax / np.float32(127)).astype(np.float32)


def np_llm_int8(x, q, scale, threshold):
    """x [M, K] in its dtype. Outlier columns: any |x| >= threshold; they go through x.dtype against the rows of W
    dequantized from int8 (a gather here, a 0/1 mask in the JAX code); the rest is per-token int8 x int8 -> int32."""
    xf = x.astype(np.float32)
    outlier = np.abs(xf).max(0) >= threshold
    xr = np.where(outlier, 0, xf).astype(np.float32)
    row = np.abs(xr).max(1, keepdims=True)
    xq = np.round(xr * _inv127(row)).astype(np.int8)
    acc = xq.astype(np.int32) @ q.astype(np.int32)
    y_out = x[:, outlier].astype(np.float32) @ q[outlier].astype(x.dtype).astype(np.float32)
    return (acc * (row / np.float32(127)) + y_out) * scale, outlier


LAYOUTS = {  # spec, x shape, kernel shape: the multi-axis layouts of query_key_value and dense
    "qkv": ("BTD,DNKH->BTNKH", (2, 5, 32), (32, 2, 3, 8)),
    "dense": ("BTNH,NHD->BTD", (2, 5, 4, 8), (4, 8, 32)),
}


def _operands(layout, dtype, seed=0):
    spec, xs, ks = LAYOUTS[layout]
    rs = np.random.RandomState(seed)
    x = rs.randn(*xs).astype(np.float32)
    flat = x.reshape(10, -1)
    flat[[1, 7], 3] = [25.0, -9.0]  # injected outlier features (3 and 11); others stay below 6
    flat[4, 11] = 14.0
    w = (rs.randn(*ks) * 0.1).astype(np.float32)
    return spec, flat.reshape(xs).astype(dtype), w


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_llm_int8_matmul_equals_numpy_reference(layout, dtype):
    spec, x, w = _operands(layout, dtype)
    tokens, contracted, _ = Q.parse_spec(spec)
    k = int(np.prod([x.shape[len(tokens) + i] for i in range(len(contracted))]))
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    q_ref, s_ref = np_quantize_weight(w2)
    q, s = Q.quantize_weight(jnp.asarray(w), spec)
    np.testing.assert_array_equal(np.asarray(q).reshape(k, -1), q_ref)
    np.testing.assert_allclose(np.asarray(s).reshape(-1), s_ref, rtol=1e-6)  # XLA may divide by 127 as a multiply

    y_ref, outlier_ref = np_llm_int8(x2, q_ref, s_ref, 6.0)
    assert sorted(np.flatnonzero(outlier_ref)) == [3, 11]
    mask = Q.outlier_features(jnp.asarray(x), len(tokens), 6.0)
    np.testing.assert_array_equal(np.asarray(mask).reshape(-1), outlier_ref)
    y = jax.jit(Q.int8_einsum, static_argnums=0)(spec, jnp.asarray(x), q, s, jnp.float32(6.0))
    np.testing.assert_allclose(np.asarray(y).reshape(y_ref.shape), y_ref, atol=1e-3, rtol=0)

    y_w = Q.int8_einsum(spec, jnp.asarray(x), q, s)  # weight-only: x @ (q * scale)
    ref_w = x2.astype(np.float32) @ (q_ref.astype(np.float32) * s_ref)
    np.testing.assert_allclose(np.asarray(y_w).reshape(ref_w.shape), ref_w, atol=1e-3, rtol=0)


def test_outlier_decomposition_reduces_matmul_error():
    spec, x, w = _operands("qkv", np.float32, seed=1)
    q, s = Q.quantize_weight(jnp.asarray(w), spec)
    exact = np.asarray(jnp.einsum(spec, x, Q.dequantize_weight(q, s, spec), precision="highest"))  # same weights
    err = {
        t: np.abs(np.asarray(Q.int8_einsum(spec, jnp.asarray(x), q, s, jnp.float32(t))) - exact).max()
        for t in (6.0, np.inf)
    }
    assert err[6.0] * 5 < err[np.inf], err


# ---- the model ------------------------------------------------------------------------------------------------------


def _ids(shape=(2, 16), vocab=128, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def float_model(tiny_ckpt):
    return neox_jax.load(tiny_ckpt[1])


@pytest.mark.parametrize("mode", Q.MODES)
def test_quantized_logits_track_float32(tiny_ckpt, float_model, mode):
    ids = _ids()
    model = neox_jax.load(tiny_ckpt[1], quantize=mode)
    qkv = model.params["layers"][0]["attention"]["query_key_value"]
    assert qkv["kernel"].dtype == jnp.int8 and qkv["scale"].shape == (4, 3, 16)
    assert ("threshold" in qkv) == (mode == "llm.int8")
    rel = _rel(model.logits(ids), float_model.logits(ids))
    assert rel < 0.03, rel


def test_outlier_path_reduces_error_on_injected_outlier_features(float_model):
    """Scale three features of both layernorms by 30: the inputs of query_key_value and dense_h_to_4h get outlier
    features (|x| up to ~100). The float32 model with those weights is the reference."""
    cfg, params = float_model.config, jax.tree.map(lambda x: x, float_model.params)
    feats = np.array([5, 23, 47])
    for layer in params["layers"].values():
        for ln in ("input_layernorm", "post_attention_layernorm"):
            layer[ln] = {k: v.at[feats].multiply(30.0) for k, v in layer[ln].items()}
    ids = _ids(seed=1)
    ref = NeoX(cfg, params).logits(ids)
    err = {
        t: _rel(NeoX(cfg, Q.quantize_tree(params, "llm.int8", threshold=t)).logits(ids), ref)
        for t in (6.0, float("inf"))
    }  # inf: plain vector-wise int8, no outlier path
    assert err[6.0] < 0.03 and err[6.0] * 2 < err[float("inf")], err


def test_quantized_greedy_generation(tiny_ckpt, float_model):
    """Greedy NeoX.generate (KV cache, compiled prefill + decode loop) end to end on int8 models. Weight-only int8 is
    deterministic per token, so its cached decode equals a full forward per step over NeoX.logits (one fixed
    left-padded window: one compile). llm.int8's outlier set depends on the tokens of each call (the whole prompt in
    prefill, one token per decode step), so it is checked to run and to keep float32's first greedy token."""
    prompt, new = [int(t) for t in _ids((1, 5), seed=2)[0]], 6

    def greedy_by_logits(m):
        ids = list(prompt)
        for _ in range(new):
            window = np.zeros((1, len(prompt) + new), np.int64)
            mask = np.zeros_like(window)
            window[0, -len(ids) :], mask[0, -len(ids) :] = ids, 1
            ids.append(int(m.logits(window, mask)[0, -1].argmax()))
        return ids[len(prompt) :]

    w8 = neox_jax.load(tiny_ckpt[1], quantize="int8")
    out = w8.generate([prompt], max_new_tokens=new, stop_token_ids=[]).token_ids[0]
    assert out == greedy_by_logits(w8)

    llm = neox_jax.load(tiny_ckpt[1], quantize="llm.int8")
    out = llm.generate([prompt], max_new_tokens=new, stop_token_ids=[]).token_ids[0]
    assert len(out) == new and all(0 <= t < llm.config.vocab_size for t in out)
    assert out[0] == int(float_model.logits([prompt])[0, -1].argmax())  # a clear top-1 margin on this seed


def test_int8_checkpoint_roundtrips_through_orbax(tiny_ckpt, float_model, tmp_path, capsys):
    _, ckpt = tiny_ckpt
    out = tmp_path / "int8"
    run_cli("-m", "convert", "quantize", ckpt, out, "--mode", "llm.int8", "--embed-out", "--quiet")  # the command
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["quantization"]["mode"] == "llm.int8" and meta["quantization"]["embed_out"]
    src_bytes = json.loads((ckpt / "metadata.json").read_text())["bytes"]
    assert meta["bytes"] < 0.4 * src_bytes  # float32 source: int8 kernels are a quarter

    loaded = neox_jax.load(out)  # detected from metadata.json: no quantize= needed
    expected = Q.quantize_tree(float_model.params, "llm.int8", embed_out=True)
    assert jax.tree.structure(loaded.params) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded.params, expected)
    ids = _ids(seed=3)
    np.testing.assert_allclose(loaded.logits(ids), NeoX(float_model.config, expected).logits(ids), atol=1e-5)

    half = neox_jax.load(out, dtype="float16")  # casts the float params only
    qkv = half.params["layers"][1]["attention"]["query_key_value"]
    assert (qkv["kernel"].dtype, qkv["scale"].dtype, qkv["bias"].dtype) == (jnp.int8, jnp.float32, jnp.float16)
    assert _rel(half.logits(ids), float_model.logits(ids)) < 0.05
    assert "threshold" not in neox_jax.load(out, quantize="int8").params["embed_out"]  # switches mode

    assert main(["convert", "quantize", str(out), str(tmp_path / "again")]) == 1
    assert "already quantized" in capsys.readouterr().err

    # weight-only int8, saved in process
    from neox_jax.store.checkpoint import save_params

    w8 = Q.quantize_tree(float_model.params, "int8")
    back = neox_jax.load(save_params(tmp_path / "w8", float_model.config, w8))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, w8)


def test_sharded_int8_equals_unsharded(float_model):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    from jax.sharding import PartitionSpec as P

    from neox_jax.parallel.sharding import make_mesh, param_specs, shard_params

    cfg, params = float_model.config, Q.quantize_tree(float_model.params, "llm.int8", embed_out=True)
    mesh = make_mesh("data=2,model=4")
    specs = param_specs(cfg, mesh, quant=Q.spec_of(params))
    attn = specs["layers"][0]["attention"]
    assert attn["query_key_value"]["kernel"] == P(None, "model", None, None)
    assert attn["query_key_value"]["scale"] == P("model", None, None)  # the kernel's output axes
    assert attn["dense"]["kernel"] == P("model", None, None) and attn["dense"]["scale"] == P(None)
    assert specs["embed_out"]["scale"] == P("model") and attn["dense"]["threshold"] == P()
    sharded = shard_params(params, cfg, mesh)
    assert sharded["layers"][0]["mlp"]["dense_h_to_4h"]["scale"].sharding.spec == P("model")
    ids = _ids((4, 16), seed=4)
    a, b = NeoX(cfg, sharded).logits(ids), NeoX(cfg, params).logits(ids)
    # sharded sums round differently (~1e-7); where that moves an activation across a rounding boundary of its int8
    # code, that token's logits move by ~1e-2: allow a few such tokens, not a systematic difference
    token_diff = np.abs(a - b).max(-1)
    assert (token_diff > 1e-4).mean() <= 0.05 and _rel(a, b) < 1e-2, token_diff
    w8 = Q.quantize_tree(params, "int8")  # weight-only: no activation rounding, so sharded matches tightly
    np.testing.assert_allclose(NeoX(cfg, shard_params(w8, cfg, mesh)).logits(ids), NeoX(cfg, w8).logits(ids), atol=1e-4)


def test_20b_int8_memory_from_eval_shape():
    cfg = neox_jax.preset("neox-20b")
    fp16 = Q.param_bytes(abstract_params(cfg, jnp.float16))
    int8 = Q.param_bytes(abstract_params(cfg, jnp.float16, quant=Q.QuantSpec("llm.int8")))
    assert 40e9 < fp16 < 42e9 and 20e9 < int8 < 22e9, (fp16, int8)
