"""The KV cache: a plain, preallocated pytree passed into and returned from the model (never a global, never grown).

    {"k": [L x [B, N, S, H]], "v": [L x [B, N, S, H]]}   unrolled layers (params["layers"][i]; the default, fastest
                                                          to decode on CPU: one buffer per layer, updated in place)
    {"k": [L, B, N, S, H], "v": [L, B, N, S, H]}          stacked layers (under lax.scan)

S is the cache length in slots; slot s of every row holds the key / value of the token written there (prompts are
left-padded, so which slots are real is tracked separately by a [B, S] bool `kv_valid`). The model writes the T new
tokens at slots cache_index..cache_index+T-1 with lax.dynamic_update_slice; with the cache donated to the jitted step,
XLA updates the buffers in place.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from neox_jax.model.config import NeoXConfig

Cache = dict


def cache_shape(cfg: NeoXConfig, batch: int, length: int) -> tuple[int, int, int, int]:
    """[B, N, S, H] of one layer's key (or value) buffer (heads before slots: see model.Attention)."""
    return batch, cfg.num_attention_heads, length, cfg.head_dim


def init_cache(cfg: NeoXConfig, batch: int, length: int, dtype=jnp.float32, stacked: bool = False) -> Cache:
    """Zeros in `dtype` (the generator passes decode.Layout.cache_dtype: float32 on CPU whatever the params, else the
    params' dtype). Call inside jit so the buffers are made on the device(s) that need them (on a mesh, pinned by
    sharding.constrain_state)."""
    shape = cache_shape(cfg, batch, length)
    layers = cfg.num_hidden_layers
    if stacked:
        return {"k": jnp.zeros((layers, *shape), dtype), "v": jnp.zeros((layers, *shape), dtype)}
    return {
        "k": [jnp.zeros(shape, dtype) for _ in range(layers)],
        "v": [jnp.zeros(shape, dtype) for _ in range(layers)],
    }


def cache_bytes(cfg: NeoXConfig, batch: int, length: int, dtype=jnp.float32) -> int:
    """Bytes of the K and V caches of every layer on one device (the GPU benchmark's roofline reads them each step)."""
    return 2 * cfg.num_hidden_layers * math.prod(cache_shape(cfg, batch, length)) * jnp.dtype(dtype).itemsize
