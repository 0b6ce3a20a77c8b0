"""The first tools of a model-internals study, built on run_with_cache: logit lens, direct logit attribution per
head, and an attention-pattern plot (matplotlib PNG).

    lens = logit_lens(model, ids)                        # [L + 1, B, T, V] logits read off each layer's residual
    labels, attr = direct_logit_attribution(model, ids)  # attr [C, B, T]: what each head / MLP adds to a logit
    plot_attention(model, "The cat sat on the mat", layer=3, path="attn.png")
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.errors import NeoXError
from neox_jax.interp.run import run_with_cache
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import is_stacked, model_from_params, unstack_layers

F32 = jnp.float32


def _model(cfg: NeoXConfig, params):
    return model_from_params(cfg, unstack_layers(params) if is_stacked(params) else params)


@functools.partial(jax.jit, static_argnames="cfg")
def _lens(params, resid, *, cfg: NeoXConfig):
    """resid [L + 1, B, T, D] float32 -> embed_out(final_layer_norm(resid)) [L + 1, B, T, V] float32, the residual
    first cast to the params' dtype as the forward holds it (so the last row is the model's own logits)."""
    model = _model(cfg, params)
    dtype = model.final_layer_norm.weight[...].dtype
    return model.logits(model.final_layer_norm(resid.astype(dtype)))


def logit_lens(model, ids, mask=None, pos=None):
    """Per layer, the residual stream read out through ln_final and embed_out: row i is blocks.{i}.hook_resid_pre
    (row 0: the embeddings), the last row blocks.{L-1}.hook_resid_post (= the model's logits). pos: one position (an
    int, negative counts from the end) to keep memory at [L + 1, B, 1, V]. Returns float32 logits (jax array)."""
    n = model.config.num_hidden_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    _, cache = run_with_cache(model, ids, names, mask)
    resid = jnp.stack([cache[name] for name in names])  # [L + 1, B, T, D]
    if pos is not None:
        resid = resid[:, :, pos][:, :, None]
    return _lens(model.params, resid, cfg=model.config)


def _unembed_columns(params, targets):
    """embed_out's columns for targets [B, T] -> [D, B, T] float32 (int8 embed_out: dequantized)."""
    out = params["embed_out"]
    cols = jnp.take(out["kernel"], targets, axis=1).astype(F32)
    return cols * jnp.take(out["scale"], targets) if "scale" in out else cols


def _per_head(dense, z, heads: int):
    """attention.dense's output split by head: z [B, T, N, H] -> [N, B, T, D] (bias left out) and the bias broadcast
    to [B, T, D]. Through the Linear itself, so int8 (and any other Linear form) is taken as the model runs it."""
    dtype = dense.kernel[...].dtype if dense.scale is None else z.dtype
    bias = dense(jnp.zeros_like(z[:1, :1]).astype(dtype), out_dtype=F32)  # [1, 1, D] (zeros without a bias)
    one_head = jnp.eye(heads, dtype=F32)[:, None, None, :, None]  # [N, 1, 1, N, 1]
    per_head = jax.vmap(lambda m: dense((z * m).astype(dtype), out_dtype=F32) - bias)(one_head)
    return per_head, jnp.broadcast_to(bias, z.shape[:2] + bias.shape[-1:])


@functools.partial(jax.jit, static_argnames="cfg")
def _dla(params, cache, targets, *, cfg: NeoXConfig):
    """-> [C, B, T] float32: each component's share of logits[b, t, targets[b, t]], and the ln_final bias's [B, T]."""
    model = _model(cfg, params)
    n, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    final = cache[f"blocks.{n - 1}.hook_resid_post"]  # [B, T, D]: the sum of every component below
    sigma = jnp.sqrt(jnp.var(final, axis=-1, keepdims=True) + cfg.layer_norm_eps)  # ln_final's scale, shared
    parts = [cache["hook_embed"][None]]
    for i in range(n):
        per_head, bias = _per_head(model.layers[i].attention.dense, cache[f"blocks.{i}.attn.hook_z"], heads)
        parts += [per_head, bias[None], cache[f"blocks.{i}.hook_mlp_out"][None]]
    comps = jnp.concatenate(parts)  # [C, B, T, D]
    ln = model.final_layer_norm
    normed = (comps - comps.mean(-1, keepdims=True)) / sigma * ln.weight[...].astype(F32)
    cols = _unembed_columns(params, targets)  # [D, B, T]
    return jnp.einsum("CBTD,DBT->CBT", normed, cols), jnp.einsum("D,DBT->BT", ln.bias[...].astype(F32), cols)


def direct_logit_attribution(model, ids, targets=None, mask=None):
    """The final residual is a sum of components (embeddings; per layer each head's output through attention.dense,
    the dense bias, the MLP output); ln_final is linear once its scale is fixed from the whole residual, so
    logit[target] = sum over components of (c - mean c) / scale * ln_final.weight . embed_out[:, target]
    + ln_final.bias . embed_out[:, target]. targets [B, T]: the token whose logit to explain at each position
    (default: the model's top prediction there).
    Returns (labels: C names "embed", "L{i}H{h}", "L{i} attn bias", "L{i} mlp", then "ln_final bias";
    values [C + 1, B, T] float32 numpy), whose sum over the first axis is the target's logit."""
    cfg = model.config
    n = cfg.num_hidden_layers
    names = [
        "hook_embed",
        *(f"blocks.{i}.{s}" for i in range(n) for s in ("attn.hook_z", "hook_mlp_out")),
        f"blocks.{n - 1}.hook_resid_post",
    ]
    logits, cache = run_with_cache(model, ids, names, mask)
    targets = jnp.argmax(logits, -1) if targets is None else jnp.asarray(targets, jnp.int32).reshape(logits.shape[:2])
    values, ln_bias = _dla(model.params, dict(cache), targets, cfg=cfg)
    labels = ["embed"] + [
        lab
        for i in range(n)
        for lab in (*(f"L{i}H{h}" for h in range(cfg.num_attention_heads)), f"L{i} attn bias", f"L{i} mlp")
    ]
    return labels + ["ln_final bias"], np.concatenate([np.asarray(values), np.asarray(ln_bias)[None]])


def plot_attention(model, tokens, layer: int, path: str | os.PathLike, heads=None) -> Path:
    """Writes a PNG of blocks.{layer}.attn.hook_pattern for one prompt: one panel per head (heads: which; default
    all), queries down, keys across, labelled with the tokens. tokens: a string (needs the model's tokenizer) or a
    list of ids. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(tokens, str):
        if model.tokenizer is None:
            raise NeoXError("plot_attention: a text prompt needs a model loaded with its tokenizer.json; pass ids")
        ids = model.tokenizer.encode(tokens)
    else:
        ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
    if not 0 <= layer < model.config.num_hidden_layers:
        raise NeoXError(f"layer {layer} out of range: the model has {model.config.num_hidden_layers} layers")
    name = f"blocks.{layer}.attn.hook_pattern"
    pattern = np.asarray(run_with_cache(model, [ids], [name])[1][name])[0]  # [N, T, T]
    heads = list(range(pattern.shape[0])) if heads is None else list(heads)
    labels = [model.tokenizer.decode([t]) for t in ids] if model.tokenizer is not None else [str(t) for t in ids]
    cols = min(4, len(heads))
    rows = -(-len(heads) // cols)
    size = 1.5 + 0.25 * len(ids)
    fig = Figure(figsize=(size * cols, size * rows))
    FigureCanvasAgg(fig)
    for k, h in enumerate(heads):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(pattern[h], vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"L{layer}H{h}")
        ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(ids)), labels, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)
    return path
