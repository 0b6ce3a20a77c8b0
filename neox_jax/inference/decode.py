"""The compiled core of generation: pure functions of (params, state), so they jit once per shape and take sharded
params / caches unchanged (shardings propagate from the arguments; with a `mesh`, the state is also pinned by
sharding.constrain_state: the KV cache over batch and heads, the rest over batch).

    prefill(cfg, static, layout, cache_len, out_batch, params, ids, mask, values, stop_mask, key) -> state
        one program per (batch, prompt bucket P, cache length S): runs the left-padded prompt [B, P] through the model
        into slots 0..P-1 of a fresh cache of S slots (at the static index 0 attention looks at the prompt only), and
        chooses the first new token from the last position's logits. The state has out_batch >= B rows (the extra
        ones repeat row 0 with an empty cache, for the caller to force done).
    decode(cfg, static, layout, params, state, values, stop_mask, force_done, n_steps) -> (state, out [B, S], steps)
        one program per (batch, S): a lax.while_loop of up to n_steps (a traced int) single-token steps, stopping early
        once every row is done; the state (cache included) is donated, so the cache is updated in place.

layout: how the params and cache are laid out (see `Layout`, `layout_for`); static.

state: {"cache": {"k", "v"} (see cache.py), "kv_valid": [B, S] bool, "tokens": [B] int32 (the last chosen token,
not yet in the cache), "positions": [B] int32 (its rotary position, counted over real tokens), "index": int32 (its
slot), "done": [B] bool, "key": PRNG key, "seen": [B, V] bool or None (repetition penalty)}.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from neox_jax.inference import sampling
from neox_jax.inference.cache import init_cache
from neox_jax.model import int8
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import LINEARS, Params, is_stacked, model_from_params, positions_from_mask, transpose_kernel
from neox_jax.parallel import sharding


class Layout(NamedTuple):
    transposed: bool  # params from transpose_kernels (below): matmuls as kernel @ x^T
    cache_dtype: str
    min_rows: int = 1  # matmuls get at least this many rows (batch rows in decode, positions for the prefill logits)
    attention: str | None = None  # the prefill's attention: None per backend, or "plain" / "xla" / "cudnn"


def transpose_kernels(params: Params) -> Params:
    """Every Linear kernel [in dims..., out dims...] as one [out, in] matrix (see Linear; stacked: [L, out, in]);
    the other leaves are shared. embed_out [D, V] -> [V, D]; query_key_value [D, N, 3, H] -> [N*3*H, D];
    dense [N, H, D] -> [D, N*H]. A copy of every matrix: the caller holds both layouts."""

    def fix(tree, name=None):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = fix(v, k)
            elif k == "kernel" and name in LINEARS:
                out[k] = transpose_kernel(name, v)
            else:
                out[k] = v
        return out

    return fix(params)


def compute_dtype(params: Params):
    return params["embed_in"]["embedding"].dtype


def layout_for(params: Params, backend: str) -> Layout:
    """What runs fastest on XLA CPU (docs/performance.md): [out, in] kernels (PyTorch's layout: faster small-batch
    matmuls), a float32 cache whatever the params (XLA CPU's bf16 attention converted the whole cache to float32
    every step), and for bf16 / f16 params at least two rows per matmul (XLA CPU converted a half-precision matrix
    to float32 to multiply it by a single vector). Elsewhere, and for int8 params (their scales follow the stored
    layout): the params as stored and a cache in their dtype."""
    if backend == "cpu" and int8.spec_of(params) is None:
        half = compute_dtype(params) in (jnp.bfloat16, jnp.float16)
        return Layout(True, "float32", 2 if half else 1)
    return Layout(False, jnp.dtype(compute_dtype(params)).name)


def prefill(
    cfg: NeoXConfig,
    static: sampling.Static,
    layout: Layout,
    cache_len: int,
    out_batch: int,
    params: Params,
    ids,
    mask,
    values,
    stop_mask,
    key,
    mesh=None,
) -> dict:
    """ids, mask [B, P] (left padding: mask 0) -> the decode state holding the first chosen token."""
    b, p = ids.shape
    model = model_from_params(cfg, params, layout.transposed, layout.attention)
    valid = mask.astype(bool)
    positions = positions_from_mask(mask)  # [B, P] rotary positions of the real tokens
    # out_batch rows from the start: the model writes rows 0..B-1 (at the static index 0 it reads no cache), so the
    # extra rows stay zeros instead of the whole cache being copied to grow it
    cache = init_cache(cfg, out_batch, cache_len, layout.cache_dtype, is_stacked(params))
    kv_valid = jnp.pad(valid, ((0, 0), (0, cache_len - p)))  # [B, S]
    hidden, cache = model.hidden_states(ids, positions, kv_valid, cache, 0)  # [B, P, D]
    logits = model.logits(hidden[:, -layout.min_rows :])[:, -1]  # [B, V] float32: the last slot is real in every row
    seen = sampling.prompt_seen(ids, mask, cfg.vocab_size) if static.repetition_penalty else None
    key, sub = jax.random.split(key)
    tokens = sampling.choose(static, values, logits, sub, seen)
    if seen is not None:
        seen = sampling.mark_seen(seen, tokens)
    state = {
        "cache": cache,
        "kv_valid": kv_valid,
        "tokens": tokens,
        "positions": positions[:, -1] + 1,
        "done": stop_mask[tokens],
        "seen": seen,
    }
    if out_batch > b:  # more rows for the decode loop: copies of row 0

        def grow(x):
            return jnp.concatenate([x, jnp.repeat(x[:1], out_batch - b, axis=0)])

        state = {**jax.tree.map(grow, {k: v for k, v in state.items() if k != "cache"}), "cache": cache}
    return sharding.constrain_state({**state, "index": jnp.asarray(p, jnp.int32), "key": key}, mesh)


def decode(
    cfg: NeoXConfig,
    static: sampling.Static,
    layout: Layout,
    params: Params,
    state: dict,
    values,
    stop_mask,
    force_done,
    n_steps,
    mesh=None,
):
    """Up to n_steps tokens per row. out[:, i] is the token chosen at step i (rows already done repeat their last
    token); steps is how many steps ran. The caller keeps index + n_steps <= S."""
    model = model_from_params(cfg, params, layout.transposed)
    b, s = state["kv_valid"].shape
    one = jnp.ones((b, 1), bool)

    def cond(carry):
        i, st, _ = carry
        return (i < n_steps) & ~jnp.all(st["done"])

    def body(carry):
        i, st, out = carry
        idx = st["index"]
        kv_valid = jax.lax.dynamic_update_slice(st["kv_valid"], one, (0, idx))  # the fed token's slot is real
        hidden, cache = model.hidden_states(
            st["tokens"][:, None], st["positions"][:, None], kv_valid, st["cache"], idx
        )  # [B, 1, D]
        logits = model.logits(hidden)[:, 0]  # [B, V] float32
        key, sub = jax.random.split(st["key"])
        tokens = sampling.choose(static, values, logits, sub, st["seen"])
        tokens = jnp.where(st["done"], st["tokens"], tokens)
        seen = None if st["seen"] is None else sampling.mark_seen(st["seen"], tokens)
        out = jax.lax.dynamic_update_slice(out, tokens[:, None], (0, i))
        new = {
            "cache": cache,
            "kv_valid": kv_valid,
            "tokens": tokens,
            "positions": st["positions"] + 1,
            "index": idx + 1,
            "done": st["done"] | stop_mask[tokens],
            "key": key,
            "seen": seen,
        }
        return i + 1, sharding.constrain_state(new, mesh), out

    state = sharding.constrain_state({**state, "done": state["done"] | force_done}, mesh)
    steps, state, out = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), state, jnp.zeros((b, s), jnp.int32)))
    return state, out, steps


# jit with the config and sampling statics as static arguments; decode donates its state (the cache) in place
prefill_jit = jax.jit(prefill, static_argnums=(0, 1, 2, 3, 4), static_argnames=("mesh",))
decode_jit = jax.jit(decode, static_argnums=(0, 1, 2), static_argnames=("mesh",), donate_argnums=(4,))
