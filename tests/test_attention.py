"""Attention through jax.nn.dot_product_attention ("xla") equals the plain path under every mask the model uses, keeps
a float32 softmax for half-precision params, matches transformers at 1,024+ tokens with left padding, and leaves the
scorer and the training step unchanged in value."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_logits, make_hf_model
from neox_jax.evaluation import scoring
from neox_jax.inference.cache import init_cache
from neox_jax.model import attention
from neox_jax.model import neox as M
from neox_jax.model.config import NeoXConfig, preset
from neox_jax.training import step as ft


def test_choose_per_backend_and_forced():
    assert attention.choose(None, jnp.float32, 64, "cpu") == attention.CPU_CHOICE
    assert attention.choose(None, jnp.bfloat16, 96, "gpu") == "cudnn"
    assert attention.choose(None, jnp.float16, 128, "gpu") == "cudnn"
    assert attention.choose(None, jnp.float32, 128, "gpu") == "xla"  # cuDNN's fused kernel is half precision only
    assert attention.choose(None, jnp.bfloat16, 100, "gpu") == "xla"  # head dim not a multiple of 8
    assert attention.choose("plain", jnp.bfloat16, 128, "gpu") == "plain"
    with pytest.raises(ValueError, match="flash"):
        attention.choose("flash", jnp.float32, 64)


def _reference(q, k, v, mask):
    """float64 softmax attention of the (already rounded) inputs: q [B, T, N, H], k, v [B, S, N, H], mask [B, T, S]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.asarray(mask)[:, None], s, -1e30)  # an empty row (left padding) is uniform, and not compared
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


@jax.jit
def _half_softmax_attention(q, k, v, mask):
    """What the float32-softmax rule forbids: QK^T rounded to the inputs' dtype before the softmax."""
    s = jnp.einsum("btnh,bsnh->bnts", q, k).astype(q.dtype) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    p = jax.nn.softmax(jnp.where(mask[:, None], s, jnp.finfo(q.dtype).min), axis=-1).astype(q.dtype)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_keeps_float32_softmax(dtype):
    """Scaled scores of std ~16: rounding QK^T to bf16 / fp16 before the softmax moves the output by several times
    its own rounding; the fused and plain paths stay within that rounding of a float64 reference."""
    rng = np.random.RandomState(0)
    b, t, n, h = 2, 64, 2, 64
    q = jnp.asarray(rng.randn(b, t, n, h) * 4.0, dtype)
    k = jnp.asarray(rng.randn(b, t, n, h) * 4.0, dtype)
    v = jnp.asarray(rng.randn(b, t, n, h), dtype)
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & (np.arange(t)[None] >= np.array([[5], [0]]))[:, None])
    ref = _reference(q, k, v, mask)
    real = np.asarray(mask).any(-1)  # queries with at least one visible key
    tol = float(jnp.finfo(dtype).eps) * np.abs(ref[real]).max()  # the output's rounding to the params' dtype
    fused = np.asarray(jax.jit(attention.fused, static_argnums=(4, 5))(q, k, v, mask, "xla", True), np.float64)
    plain = np.asarray(jax.jit(M._attend)(*(a.transpose(0, 2, 1, 3) for a in (q, k, v)), mask), np.float64)
    plain = plain.astype(dtype).astype(np.float64).transpose(0, 2, 1, 3)
    assert np.isfinite(fused).all()
    assert np.abs(fused - ref)[real].max() <= tol
    assert np.abs(plain - ref)[real].max() <= tol
    low = np.asarray(_half_softmax_attention(q, k, v, mask), np.float64)
    assert np.abs(low - ref)[real].max() > 3 * tol  # what the test would catch


def _tiny(stacked=False, dtype=jnp.float32):
    cfg = preset("tiny")
    return cfg, M.init_params(cfg, dtype, seed=1, stacked=stacked)


@functools.partial(jax.jit, static_argnums=0, static_argnames="attention")
def _forward_and_prefill(cfg, params, ids, valid, attention):
    """Logits without a cache, and the hidden states and cache of a prefill into 8 more slots than the prompt."""
    model = M.model_from_params(cfg, params, attention=attention)
    pos = M.positions_from_mask(valid)
    logits = model(ids, pos, valid)[0]
    cache = init_cache(cfg, ids.shape[0], ids.shape[1] + 8, jnp.float32, M.is_stacked(params))
    hidden, cache = model.hidden_states(ids, pos, jnp.pad(valid, ((0, 0), (0, 8))), cache, 0)
    return logits, hidden, cache


@pytest.mark.parametrize("t, stacked", [(19, False), (256, True)])  # 256: the long-prompt causal blocks
def test_xla_equals_plain_left_padding_and_cache(t, stacked):
    cfg, params = _tiny(stacked)
    rng = np.random.RandomState(t)
    ids = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, t)), jnp.int32)
    valid = jnp.asarray(np.arange(t)[None] >= np.array([[7], [0]]))  # row 0 left-padded
    out = {impl: _forward_and_prefill(cfg, params, ids, valid, attention=impl) for impl in ("plain", "xla")}
    assert np.isfinite(np.asarray(out["xla"][0])).all()  # the padding rows too
    for a, b in zip(jax.tree.leaves(out["plain"]), jax.tree.leaves(out["xla"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_xla_equals_plain_packed_rows():
    """The scorer's packed tree masks, with and without rows (its scored positions), long rows included."""
    cfg, params = _tiny()
    rng = np.random.RandomState(2)
    t = 256
    ids = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, t)), jnp.int32)
    doc = np.repeat(np.arange(4), t // 4)[None].repeat(2, 0)
    doc[1, 200:] = -1  # a padding tail
    branch = np.zeros((2, t), np.int32)
    branch[:, 40:64] = np.repeat([1, 2], 12)  # two branches of document 0
    pos = jnp.asarray(np.tile(np.arange(t // 4), 4)[None].repeat(2, 0))
    mask = scoring.tree_mask(jnp.asarray(doc), jnp.asarray(branch))
    rows = jnp.asarray([[0, 50, 63, 255], [3, 3, 130, 199]])
    run = jax.jit(
        lambda p, r, attention: scoring.hidden_states(cfg, p, ids, pos, mask, r, attention)[0],
        static_argnames="attention",
    )
    for r in (None, rows):
        np.testing.assert_allclose(
            np.asarray(run(params, r, attention="plain")), np.asarray(run(params, r, "xla")), atol=2e-5
        )


def test_scorer_unchanged():
    cfg, params = _tiny()
    cfg = cfg.replace(max_position_embeddings=64)
    rng = np.random.RandomState(0)
    reqs = [
        (
            rng.randint(0, cfg.vocab_size, rng.randint(1, 90)).tolist(),
            rng.randint(0, cfg.vocab_size, rng.randint(1, 9)).tolist(),
        )
        for _ in range(6)
    ]
    kw = {"max_length": 64, "batch_rows": 8, "pack_length": 64}  # one batch shape: one compile per attention
    plain = scoring.score_requests(cfg, params, reqs, attention="plain", **kw)
    xla = scoring.score_requests(cfg, params, reqs, attention="xla", **kw)
    np.testing.assert_allclose([p[0] for p in plain], [x[0] for x in xla], rtol=1e-5)
    assert [p[1] for p in plain] == [x[1] for x in xla]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_train_step_unchanged(dtype):
    """Loss and float32 gradients of a full fine-tuning step (every parameter trainable) through either attention."""
    cfg, params = _tiny()
    trainable, frozen = ft.split_params(params, "all")
    windows = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 33)), jnp.int32)
    got = {
        impl: jax.jit(ft.loss_and_grads, static_argnums=(0, 4), static_argnames="attention")(
            cfg, trainable, frozen, windows, dtype, attention=impl
        )
        for impl in ("plain", "xla")
    }
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(float(got["plain"][0]), float(got["xla"][0]), rtol=tol)
    for a, b in zip(jax.tree.leaves(got["plain"][1]), jax.tree.leaves(got["xla"][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol * max(1.0, float(np.abs(a).max())))


def _params_from_hf(cfg: NeoXConfig, model, dtype) -> dict:
    from convert.mapping import group_entries, set_path

    state = {k.replace("lm_head.", "embed_out."): v.numpy() for k, v in model.state_dict().items()}  # transformers 5
    params: dict = {}
    for g in ["embed_in", *[f"layers.{i}" for i in range(cfg.num_hidden_layers)], "final_layer_norm", "embed_out"]:
        for e in group_entries(cfg, g):
            path = ("layers", int(g.split(".")[1]), *e.path) if g.startswith("layers.") else (g, *e.path)
            set_path(params, path, jnp.asarray(e.to_ours(state[e.hf_name]), dtype))
    return params


def test_long_context_matches_hf():
    """1,024 tokens (the long-prompt causal blocks), the first row left-padded by 76: float32 logits equal
    transformers' at every real position (both attentions), float16 params stay finite and close."""
    t, pad = 1024, 76
    hf = make_hf_model(seed=3, max_position_embeddings=1100)
    cfg = NeoXConfig.from_hf_config(hf.config.to_dict())
    ids = np.random.RandomState(4).randint(0, cfg.vocab_size, (2, t))
    mask = np.ones((2, t), np.int64)
    mask[0, :pad] = 0
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    m = jnp.asarray(mask)
    run = jax.jit(
        lambda p, attention: M.model_from_params(cfg, p, attention=attention)(
            jnp.asarray(ids), M.positions_from_mask(m), m.astype(bool)
        )[0],
        static_argnames="attention",
    )
    params = _params_from_hf(cfg, hf, jnp.float32)
    for impl in (None, "xla"):
        ours = np.asarray(run(params, attention=impl))
        assert np.abs(ours[real] - ref[real]).max() <= 1e-4, impl
    half = np.asarray(run(_params_from_hf(cfg, hf, jnp.float16), attention="xla"))
    assert np.isfinite(half).all()
    assert np.abs(half[real] - ref[real]).max() <= 0.05 * max(1.0, np.abs(ref).max())
