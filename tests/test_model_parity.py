"""Logits of converted checkpoints equal the Hugging Face reference (a random tiny GPTNeoXForCausalLM)."""

import numpy as np
import pytest

import neox_jax
from conftest import convert_hf, hf_logits, make_hf_model

CASES = {
    "parallel-rot0.25-gelu": dict(use_parallel_residual=True, rotary_pct=0.25, hidden_act="gelu"),
    "sequential": dict(use_parallel_residual=False),
    "rot1.0": dict(rotary_pct=1.0),
    "gelu_fast": dict(hidden_act="gelu_fast"),
    "intermediate-not-4x": dict(intermediate_size=96),
}


def _ids(vocab=128, shape=(2, 19), seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_hf(case, tmp_path):
    model = make_hf_model(seed=1, **CASES[case])
    model.save_pretrained(tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours = neox_jax.load(tmp_path / "ckpt")
    ids = _ids()
    np.testing.assert_array_less(np.abs(ours.logits(ids) - hf_logits(model, ids)).max(), 1e-4)


@pytest.mark.parametrize("fmt", ["sharded-safetensors", "bin"])
def test_checkpoint_formats(fmt, tmp_path):
    model = make_hf_model(seed=2)
    if fmt == "bin":
        import torch

        # transformers 5 writes only safetensors: write the .bin layout the published Pythia / 20B files use,
        # with the non-persistent buffers older transformers saved (they must be recognised and skipped)
        (tmp_path / "hf").mkdir()
        model.config.to_json_file(tmp_path / "hf" / "config.json")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
        state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
        torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    else:
        model.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert_hf(tmp_path / "hf", tmp_path / "ckpt")
    ids = _ids(seed=3)
    diff = np.abs(neox_jax.load(tmp_path / "ckpt").logits(ids) - hf_logits(model, ids)).max()
    assert diff <= 1e-4


def test_left_padding_matches_hf(tiny_ckpt):
    model, ckpt = tiny_ckpt
    ids = _ids(shape=(2, 12), seed=4)
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # first row left-padded
    ours = neox_jax.load(ckpt).logits(ids, mask)
    ref = hf_logits(model, ids, mask)
    assert np.abs(ours[mask == 1] - ref[mask == 1]).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_close_to_float32(tiny_ckpt, dtype):
    _, ckpt = tiny_ckpt
    ids = _ids(seed=5)
    ref = neox_jax.load(ckpt).logits(ids)
    half = neox_jax.load(ckpt, dtype=dtype)
    assert str(half.dtype) == dtype
    out = half.logits(ids)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    tol = 0.02 if dtype == "float16" else 0.1
    assert np.abs(out - ref).max() <= tol * max(1.0, np.abs(ref).max())
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_gelu_equals_torch_over_a_wide_range():
    """The MLP's GELU against torch's, on activations far larger than a random tiny model produces (a trained model's
    reach |x| of 10 and more): the exact erf form and the tanh form."""
    import torch

    from neox_jax.model.neox import gelu

    x = np.linspace(-12, 12, 20001, dtype=np.float32)
    for approximate, torch_form in ((False, "none"), (True, "tanh")):
        want = torch.nn.functional.gelu(torch.from_numpy(x), approximate=torch_form).numpy()
        np.testing.assert_allclose(np.asarray(gelu(x, approximate)), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("stacked", [False, True])
def test_selected_rows_equal_full_forward(parallel, stacked):
    """hidden_states(rows=...), as the scorer calls it (the last layer runs only the selected queries, MLP and
    residual), equals the full forward's states at those rows; a repeated row and the long-prompt length included."""
    import dataclasses

    import jax.numpy as jnp

    from neox_jax.model import neox as M

    cfg = dataclasses.replace(neox_jax.preset("tiny"), use_parallel_residual=parallel)
    model = M.model_from_params(cfg, M.init_params(cfg, seed=1, stacked=stacked))
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 256)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(256), (2, 256))
    valid = jnp.ones((2, 256), bool)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((256, 256), bool)), (2, 256, 256))
    rows = jnp.asarray([[0, 5, 200, 255], [3, 3, 100, 254]])
    full = model.hidden_states(ids, pos, valid, attn_mask=mask)[0]
    picked = model.hidden_states(ids, pos, valid, attn_mask=mask, rows=rows)[0]
    assert picked.shape == (2, 4, cfg.hidden_size)
    np.testing.assert_allclose(
        np.asarray(picked), np.take_along_axis(np.asarray(full), np.asarray(rows)[..., None], 1), atol=1e-5
    )
