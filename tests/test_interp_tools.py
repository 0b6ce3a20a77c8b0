"""Logit lens, direct logit attribution and the attention plot; run_with_cache on half precision, int8, stacked layers,
a fine-tuned run and a mesh."""

import jax
import numpy as np
import pytest

import neox_jax
from neox_jax.api import NeoX
from neox_jax.errors import NeoXError
from neox_jax.interp import tools as interp_tools
from neox_jax.model.neox import stack_layers
from neox_jax.parallel import sharding

IDS = np.random.RandomState(0).randint(0, 128, (2, 9))


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return neox_jax.load(tiny_ckpt[1])


def test_logit_lens_last_row_is_the_logits(model):
    lens = np.asarray(interp_tools.logit_lens(model, IDS))
    assert lens.shape == (model.config.num_hidden_layers + 1, 2, 9, 128) and lens.dtype == np.float32
    np.testing.assert_allclose(lens[-1], model.logits(IDS), atol=1e-5)
    assert np.abs(lens[0] - lens[-1]).max() > 0.1  # the embeddings alone read differently
    last = np.asarray(interp_tools.logit_lens(model, IDS, pos=-1))
    np.testing.assert_allclose(last[:, :, 0], lens[:, :, -1], atol=1e-5)


def test_direct_logit_attribution_sums_to_the_logit(model):
    cfg = model.config
    labels, values = interp_tools.direct_logit_attribution(model, IDS)
    assert len(labels) == values.shape[0] == 1 + cfg.num_hidden_layers * (cfg.num_attention_heads + 2) + 1
    assert labels[1] == "L0H0" and labels[-1] == "ln_final bias"
    logits = model.logits(IDS)
    top = logits.max(-1)
    np.testing.assert_allclose(values.sum(0), top, atol=1e-4)
    targets = np.full((2, 9), 5)
    _, values5 = interp_tools.direct_logit_attribution(model, IDS, targets=targets)
    np.testing.assert_allclose(values5.sum(0), logits[..., 5], atol=1e-4)


def test_plot_attention_writes_a_png(model, tmp_path):
    out = interp_tools.plot_attention(model, IDS[0], layer=1, path=tmp_path / "attn.png", heads=[0, 3])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(NeoXError, match="layer 7 out of range"):
        interp_tools.plot_attention(model, IDS[0], layer=7, path=tmp_path / "x.png")
    with pytest.raises(NeoXError, match="tokenizer"):
        interp_tools.plot_attention(model, "some text", layer=0, path=tmp_path / "x.png")


@pytest.mark.parametrize("variant", ["bfloat16", "int8", "stacked"])
def test_variants_cache_float32_and_logits_equal_the_forward(tiny_ckpt, model, variant):
    if variant == "stacked":
        other = NeoX(model.config, stack_layers(model.params))
    else:
        kw = {"dtype": "bfloat16"} if variant == "bfloat16" else {"quantize": "int8"}
        other = neox_jax.load(tiny_ckpt[1], **kw)
    logits, cache = other.run_with_cache(IDS)
    _, ref = model.run_with_cache(IDS)
    assert all(a.dtype == np.float32 for a in cache.values()) and list(cache) == list(ref)
    np.testing.assert_allclose(np.asarray(logits), other.logits(IDS), atol=1e-5 if variant != "bfloat16" else 0.05)
    tol = {"stacked": 1e-6, "int8": 0.05, "bfloat16": 0.1}[variant]
    for name in ("blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"):
        assert np.abs(np.asarray(cache[name]) - np.asarray(ref[name])).max() <= tol, name


def test_finetuned_run(tiny_ckpt, model, tmp_path):
    from neox_jax.training.step import save_finetuned, split_params

    trainable, _ = split_params(model.params, "biases")
    save_finetuned(tmp_path, model.config, "biases", jax.tree.map(lambda x: x + 0.1, trainable))
    tuned = neox_jax.load(tiny_ckpt[1], finetuned=tmp_path)
    logits, cache = tuned.run_with_cache(IDS, ["blocks.0.hook_attn_out"])
    np.testing.assert_allclose(np.asarray(logits), tuned.logits(IDS), atol=1e-5)
    base = model.run_with_cache(IDS, ["blocks.0.hook_attn_out"])[1]["blocks.0.hook_attn_out"]
    assert np.abs(np.asarray(cache["blocks.0.hook_attn_out"]) - np.asarray(base)).max() > 0.05


@pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
)
def test_mesh_equals_one_device(tiny_ckpt, model):
    sharded = neox_jax.load(tiny_ckpt[1], mesh=sharding.make_mesh("data=2,model=4"))
    mask = np.ones_like(IDS)
    mask[0, :3] = 0
    hooks = [("blocks.0.attn.hook_z", lambda z: z.at[:, :, 1].set(0.0))]
    logits, cache = sharded.run_with_cache(IDS, r".*hook_(pattern|resid_post)", mask=mask, fwd_hooks=hooks)
    ref_logits, ref = model.run_with_cache(IDS, r".*hook_(pattern|resid_post)", mask=mask, fwd_hooks=hooks)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    for name in ref:
        np.testing.assert_allclose(np.asarray(cache[name]), np.asarray(ref[name]), atol=1e-5, err_msg=name)
