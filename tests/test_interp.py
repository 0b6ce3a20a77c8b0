"""run_with_cache / run_with_hooks against transformers (eager attention, torch forward hooks), both residual modes."""

import numpy as np
import pytest

import neox_jax
from conftest import make_hf_model
from neox_jax.errors import NeoXError
from neox_jax.interp import run as interp

TOL = 1e-5
RESIDUAL = {"parallel": True, "sequential": False}


@pytest.fixture(scope="module", params=list(RESIDUAL))
def pair(request, tmp_path_factory):
    """(hf model with eager attention, our NeoX) over the same random weights."""
    from convert.hf import convert_hf

    hf = make_hf_model(seed=3, use_parallel_residual=RESIDUAL[request.param])
    hf.set_attn_implementation("eager")
    d = tmp_path_factory.mktemp(f"interp-{request.param}")
    hf.save_pretrained(d / "hf")
    convert_hf(d / "hf", d / "ckpt", progress=False)
    return hf, neox_jax.load(d / "ckpt")


def _batch(seed=0):
    ids = np.random.RandomState(seed).randint(0, 128, (2, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # the second row left-padded
    return ids, mask


def _torch_run(hf, ids, mask, pre_hooks=(), fwd_hooks=()):
    """HF forward with hidden states, attentions, and the outputs of every attention / mlp / layer module."""
    import torch

    from neox_jax.model.neox import positions_from_mask

    seen, handles = {}, []
    for i, layer in enumerate(hf.gpt_neox.layers):
        for name, mod in (("attn_out", layer.attention), ("mlp_out", layer.mlp), ("resid_post", layer)):
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, out, key=(name, i): seen.__setitem__(key, (out[0] if isinstance(out, tuple) else out))
                )
            )
    handles += [mod.register_forward_pre_hook(fn) for mod, fn in pre_hooks]
    handles += [mod.register_forward_hook(fn) for mod, fn in fwd_hooks]
    try:
        with torch.no_grad():
            out = hf(
                torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(np.asarray(positions_from_mask(mask))),
                output_hidden_states=True,
                output_attentions=True,
            )
    finally:
        for h in handles:
            h.remove()
    return out, {k: v.float().numpy() for k, v in seen.items()}


def _close(ours, ref, real, what):
    diff = np.abs(np.asarray(ours)[real] - np.asarray(ref)[real]).max()
    assert diff <= TOL, f"{what}: max |diff| {diff:.2e}"


def test_activations_equal_transformers(pair):
    hf, model = pair
    ids, mask = _batch()
    real = mask == 1
    logits, cache = model.run_with_cache(ids, mask=mask)
    out, seen = _torch_run(hf, ids, mask)
    n = hf.config.num_hidden_layers
    assert len(out.hidden_states) == n + 1 and all(a.dtype == np.float32 for a in cache.values())
    for i in range(n):
        _close(cache[f"blocks.{i}.hook_resid_pre"], out.hidden_states[i].numpy(), real, f"resid_pre {i}")
        _close(cache[f"blocks.{i}.hook_attn_out"], seen["attn_out", i], real, f"attn_out {i}")
        _close(cache[f"blocks.{i}.hook_mlp_out"], seen["mlp_out", i], real, f"mlp_out {i}")
        _close(cache[f"blocks.{i}.hook_resid_post"], seen["resid_post", i], real, f"resid_post {i}")
        pattern = np.asarray(cache[f"blocks.{i}.attn.hook_pattern"]).transpose(0, 2, 1, 3)  # [B, T(query), N, T]
        _close(pattern, out.attentions[i].numpy().transpose(0, 2, 1, 3), real, f"pattern {i}")
    _close(cache["unembed.hook_in"], out.hidden_states[n].numpy(), real, "unembed.hook_in")  # HF: after the norm
    assert np.abs(np.asarray(logits)[real] - out.logits.numpy()[real]).max() <= 1e-4
    np.testing.assert_array_equal(np.asarray(cache["unembed.hook_out"]), np.asarray(logits))


def _layernorms(hf):
    """{TransformerLens prefix: transformers LayerNorm module}."""
    norms = {"ln_final": hf.gpt_neox.final_layer_norm}
    for i, layer in enumerate(hf.gpt_neox.layers):
        norms[f"blocks.{i}.ln1"], norms[f"blocks.{i}.ln2"] = layer.input_layernorm, layer.post_attention_layernorm
    return norms


def test_layernorm_hooks_are_transformerlens_scale_and_normalized(pair):
    """TransformerLens's LayerNorm: hook_scale = sqrt(var + eps) [.., 1], hook_normalized = (x - mean) / scale, before
    the weight and bias; the reference is computed from each transformers LayerNorm's input (a forward pre-hook)."""
    hf, model = pair
    ids, mask = _batch()
    real = mask == 1
    _, cache = model.run_with_cache(ids, r".*ln(1|2|_final)\.hook_(scale|normalized)", mask=mask)
    inputs = {}
    pre = [(m, lambda m, a, key=k: inputs.__setitem__(key, a[0].float().numpy())) for k, m in _layernorms(hf).items()]
    _torch_run(hf, ids, mask, pre_hooks=pre)
    assert len(inputs) == 2 * hf.config.num_hidden_layers + 1 and len(cache) == 2 * len(inputs)
    for prefix, x in inputs.items():
        centered = x - x.mean(-1, keepdims=True)
        scale = np.sqrt(np.square(centered).mean(-1, keepdims=True) + hf.config.layer_norm_eps)
        assert cache[f"{prefix}.hook_scale"].shape == (*ids.shape, 1)
        _close(cache[f"{prefix}.hook_scale"], scale, real, f"{prefix}.hook_scale")
        _close(cache[f"{prefix}.hook_normalized"], centered / scale, real, f"{prefix}.hook_normalized")
    norm = _layernorms(hf)["ln_final"]  # the weight and bias are not in it: they differ from 1 and 0 here
    assert np.abs(norm.weight.detach().numpy() - 1).max() > 0.01 or np.abs(norm.bias.detach().numpy()).max() > 0.01


def test_editing_hook_scale_flows_through_the_weight_and_bias(pair):
    """Doubling blocks.0.ln1.hook_scale = halving the normalized values before input_layernorm's weight and bias."""
    hf, model = pair
    ids, mask = _batch(seed=5)
    ln = hf.gpt_neox.layers[0].input_layernorm

    def halve(module, args, out):  # out = n * w + b  ->  (n / 2) * w + b
        return (out - module.bias) / 2 + module.bias

    ours = model.run_with_hooks(ids, [("blocks.0.ln1.hook_scale", lambda s: s * 2.0)], mask=mask)
    ref, _ = _torch_run(hf, ids, mask, fwd_hooks=[(ln, halve)])
    real = mask == 1
    plain = model.run_with_hooks(ids, [], mask=mask)
    assert np.abs(np.asarray(ours) - np.asarray(plain))[real].max() > 1e-3
    assert np.abs(np.asarray(ours)[real] - ref.logits.numpy()[real]).max() <= 1e-4


def test_head_ablation_equals_torch_hook_on_dense_input(pair):
    hf, model = pair
    ids, mask = _batch(seed=1)
    layer, head, hd = 1, 2, hf.config.hidden_size // hf.config.num_attention_heads

    def torch_ablate(module, args):
        x = args[0].clone()
        x[..., head * hd : (head + 1) * hd] = 0
        return (x,)

    def ablate(z):  # [B, T, N, H]
        return z.at[:, :, head].set(0.0)

    ours = model.run_with_hooks(ids, [(f"blocks.{layer}.attn.hook_z", ablate)], mask=mask)
    ref, _ = _torch_run(hf, ids, mask, pre_hooks=[(hf.gpt_neox.layers[layer].attention.dense, torch_ablate)])
    real = mask == 1
    plain = model.run_with_hooks(ids, [], mask=mask)
    assert np.abs(np.asarray(ours) - np.asarray(plain))[real].max() > 1e-3  # the ablation changes the logits
    assert np.abs(np.asarray(ours)[real] - ref.logits.numpy()[real]).max() <= 1e-4


def test_steering_vector_equals_torch_hook_on_block_output(pair):
    import torch

    hf, model = pair
    ids, mask = _batch(seed=2)
    vec = np.random.RandomState(7).randn(hf.config.hidden_size).astype(np.float32)
    ours = model.run_with_hooks(ids, [("blocks.0.hook_resid_post", lambda x: x + vec)], mask=mask)
    ref, _ = _torch_run(hf, ids, mask, fwd_hooks=[(hf.gpt_neox.layers[0], lambda m, a, out: out + torch.tensor(vec))])
    real = mask == 1
    assert np.abs(np.asarray(ours)[real] - ref.logits.numpy()[real]).max() <= 1e-4


def test_names_filter_forms_and_bad_names(pair):
    _, model = pair
    ids, _ = _batch()
    want = ["blocks.1.attn.hook_pattern", "hook_embed"]
    cache = model.run_with_cache(ids, want)[1]
    assert list(cache) == ["hook_embed", "blocks.1.attn.hook_pattern"]  # forward order
    with pytest.raises(NeoXError, match="close names in it: blocks.1.attn.hook_pattern"):
        cache["blocks.1.attn.hook_patern"]
    cfg = model.config
    assert interp.select_names(cfg, r"blocks\.\d+\.hook_resid_pre") == (
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
    )
    assert interp.select_names(cfg, lambda n: n.endswith("mlp.hook_post")) == (
        "blocks.0.mlp.hook_post",
        "blocks.1.mlp.hook_post",
    )
    assert ("blocks.0.hook_resid_mid" in interp.hook_names(cfg)) == (not cfg.use_parallel_residual)
    with pytest.raises(NeoXError, match="blocks.0.hook_resid_pre"):
        model.run_with_cache(ids, ["blocks.0.hook_resid_pr"])
    with pytest.raises(NeoXError, match="blocks.1.attn.hook_pattern"):
        model.run_with_hooks(ids, [("blocks.1.attn.hook_patern", lambda x: x)])
    with pytest.raises(NeoXError, match="unknown hook name 'blocks.5.hook_resid_pre'"):
        model.run_with_cache(ids, ["blocks.5.hook_resid_pre"])


def test_bad_hook_output_names_the_hook(pair):
    _, model = pair
    ids, _ = _batch()
    with pytest.raises(NeoXError, match=r"hook on 'blocks.0.hook_mlp_out' returned float32 \(2, 11\)"):
        model.run_with_hooks(ids, [("blocks.0.hook_mlp_out", lambda x: x.sum(-1))])
    with pytest.raises(NeoXError, match="hook on 'blocks.1.attn.hook_v' returned int32"):
        model.run_with_hooks(ids, [("blocks.1.attn.hook_v", lambda x: x.astype("int32"))])


def test_patching_from_a_cache_reuses_the_compiled_program(pair):
    """A new hook function of the same code, closing over other arrays, runs without compiling again; a new Python
    scalar in its closure compiles once more."""
    _, model = pair
    clean, _ = _batch(seed=3)
    corrupt, _ = _batch(seed=4)
    name = "blocks.0.hook_resid_post"
    _, clean_cache = model.run_with_cache(clean, [name])

    def patch_from(cache, pos):
        return lambda x: x.at[:, pos].set(cache[name][:, pos])

    before = interp._forward._cache_size()
    patched_all = model.run_with_hooks(corrupt, [(name, lambda x: clean_cache[name])])
    np.testing.assert_allclose(np.asarray(patched_all), np.asarray(model.run_with_cache(clean, [])[0]), atol=1e-5)
    model.run_with_hooks(corrupt, [(name, patch_from(clean_cache, 3))])
    compiled = interp._forward._cache_size()
    other_cache = model.run_with_cache(corrupt, [name])[1]
    model.run_with_hooks(corrupt, [(name, patch_from(other_cache, 3))])  # new closure, new arrays
    assert interp._forward._cache_size() == compiled
    model.run_with_hooks(corrupt, [(name, patch_from(other_cache, 5))])  # a new static position
    assert interp._forward._cache_size() == compiled + 1 > before


def test_tl_hook_signature_and_regex_hook_names(pair):
    _, model = pair
    ids, _ = _batch()
    seen = []

    def zero_mlp(act, hook):
        seen.append(hook.name)
        return act * 0.0

    out = model.run_with_hooks(ids, [(r"blocks\.\d+\.hook_mlp_out", zero_mlp)])
    assert seen == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    _, cache = model.run_with_cache(ids, ["blocks.1.hook_mlp_out"], fwd_hooks=[("blocks.1.hook_mlp_out", zero_mlp)])
    assert not np.asarray(cache["blocks.1.hook_mlp_out"]).any()  # the cache holds the hooked value
    assert np.asarray(out).shape == (2, 11, 128)


def test_hook_functions_split_into_static_code_and_traced_arrays():
    import functools

    from neox_jax.model import hooks as hookfns

    def make(scale, offset):
        return lambda x: x * scale + offset

    a, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    spec1, arrays1 = hookfns.split(make(2.0, a))
    assert arrays1[0] is a
    spec2, arrays2 = hookfns.split(make(2.0, b))
    assert spec1 == spec2 and hash(spec1) == hash(spec2) and arrays2[0] is b  # same code, other array: one program
    assert hookfns.split(make(3.0, a))[0] != spec1 and hookfns.split(make(2, a))[0] != spec1  # 3.0, and int 2 vs 2.0
    np.testing.assert_array_equal(hookfns.join(spec1, [b])(np.ones(3)), [2.0, 2.0, 2.0])

    def patch(x, value=None, pos=0):
        return x + value * pos

    spec, arrays = hookfns.split(functools.partial(patch, value=a, pos=4))
    assert len(arrays) == 1 and hookfns.split(functools.partial(patch, value=b, pos=4))[0] == spec
    np.testing.assert_array_equal(hookfns.join(spec, [b])(np.ones(3)), np.ones(3))
    seen = []
    spec, arrays = hookfns.split(lambda x: seen.append(1) or x)  # no arrays: the list itself, not a copy
    hookfns.join(spec, arrays)(0)
    assert seen == [1] and arrays == []
