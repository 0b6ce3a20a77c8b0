"""The compiled core of generation: pure functions of (params, state), so they jit once per shape and take sharded
params / caches unchanged (no mesh appears here; shardings propagate from the arguments).

    prefill(cfg, static, cache_len, params, ids, mask, values, stop_mask, key) -> state
        one program per (batch, prompt bucket P, cache length S): runs the left-padded prompt [B, P] through the model
        into slots 0..P-1 of a fresh cache of S slots (at the static index 0 attention looks at the prompt only), and
        chooses the first new token from the last position's logits.
    decode(cfg, static, params, state, values, stop_mask, force_done, n_steps) -> (state, out [B, S], steps)
        one program per (batch, S): a lax.while_loop of up to n_steps (a traced int) single-token steps, stopping early
        once every row is done; the state (cache included) is donated, so the cache is updated in place.

state: {"cache": {"k", "v"} (see cache.py), "kv_valid": [B, S] bool, "tokens": [B] int32 (the last chosen token,
not yet in the cache), "positions": [B] int32 (its rotary position, counted over real tokens), "index": int32 (its
slot), "done": [B] bool, "key": PRNG key, "seen": [B, V] bool or None (repetition penalty)}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from neox_jax import sampling
from neox_jax.cache import init_cache
from neox_jax.config import NeoXConfig
from neox_jax.model import Params, is_stacked, model_from_params, positions_from_mask


def compute_dtype(params: Params):
    return params["embed_in"]["embedding"].dtype


def prefill(cfg: NeoXConfig, static: sampling.Static, cache_len: int, params: Params, ids, mask, values, stop_mask,
            key) -> dict:
    """ids, mask [B, P] (left padding: mask 0) -> the decode state holding the first chosen token."""
    b, p = ids.shape
    model = model_from_params(cfg, params)
    valid = mask.astype(bool)
    positions = positions_from_mask(mask)  # [B, P] rotary positions of the real tokens
    cache = init_cache(cfg, b, cache_len, compute_dtype(params), is_stacked(params))
    kv_valid = jnp.pad(valid, ((0, 0), (0, cache_len - p)))  # [B, S]
    hidden, cache = model.hidden_states(ids, positions, kv_valid, cache, 0)  # [B, P, D]
    logits = model.logits(hidden[:, -1:])[:, 0]  # [B, V] float32: the last slot is real in every row
    seen = sampling.prompt_seen(ids, mask, cfg.vocab_size) if static.repetition_penalty else None
    key, sub = jax.random.split(key)
    tokens = sampling.choose(static, values, logits, sub, seen)
    if seen is not None:
        seen = sampling.mark_seen(seen, tokens)
    return {"cache": cache,
            "kv_valid": kv_valid,
            "tokens": tokens,
            "positions": positions[:, -1] + 1,
            "index": jnp.asarray(p, jnp.int32),
            "done": stop_mask[tokens],
            "key": key,
            "seen": seen}


def decode(cfg: NeoXConfig, static: sampling.Static, params: Params, state: dict, values, stop_mask, force_done,
           n_steps):
    """Up to n_steps tokens per row. out[:, i] is the token chosen at step i (rows already done repeat their last
    token); steps is how many steps ran. The caller keeps index + n_steps <= S."""
    model = model_from_params(cfg, params)
    b, s = state["kv_valid"].shape
    one = jnp.ones((b, 1), bool)

    def cond(carry):
        i, st, _ = carry
        return (i < n_steps) & ~jnp.all(st["done"])

    def body(carry):
        i, st, out = carry
        idx = st["index"]
        kv_valid = jax.lax.dynamic_update_slice(st["kv_valid"], one, (0, idx))  # the fed token's slot is real
        hidden, cache = model.hidden_states(st["tokens"][:, None], st["positions"][:, None], kv_valid, st["cache"],
                                            idx)  # [B, 1, D]
        logits = model.logits(hidden)[:, 0]  # [B, V] float32
        key, sub = jax.random.split(st["key"])
        tokens = sampling.choose(static, values, logits, sub, st["seen"])
        tokens = jnp.where(st["done"], st["tokens"], tokens)
        seen = None if st["seen"] is None else sampling.mark_seen(st["seen"], tokens)
        out = jax.lax.dynamic_update_slice(out, tokens[:, None], (0, i))
        new = {"cache": cache, "kv_valid": kv_valid, "tokens": tokens, "positions": st["positions"] + 1,
               "index": idx + 1, "done": st["done"] | stop_mask[tokens], "key": key, "seen": seen}
        return i + 1, new, out

    state = {**state, "done": state["done"] | force_done}
    steps, state, out = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), state, jnp.zeros((b, s), jnp.int32)))
    return state, out, steps


# jit with the config and sampling statics as static arguments; decode donates its state (the cache) in place
prefill_jit = jax.jit(prefill, static_argnums=(0, 1, 2))
decode_jit = jax.jit(decode, static_argnums=(0, 1), donate_argnums=(3,))
