"""The one decode core: a typed state pytree and a few pure functions over it, which `Generator` (generate,
generate_stream), the server's continuous batching (serve.Engine) and speculative decoding all drive.

    state = empty_state(cfg, layout, rows, cache_len, settings, ...)        # B rows of S cache slots, all done
    state, hidden, first = prefill_into(cfg, static, layout, params, state, row0, ids, mask)
                            # prompts ids/mask [R, P] (left or right padding) into rows row0..row0+R-1: their caches
                            # (slots 0..P-1), first tokens, positions and lengths
    state, logits = extend(cfg, layout, params, state, ids, uniform)
                            # ids [B, T] at each row's own next slots lengths..lengths+T-1 (rotary positions
                            # positions..positions+T-1), written into the cache; logits [B, T, V] float32; advances
                            # lengths and positions by T. Speculative decoding runs the target over its k+1 new
                            # positions with this.
    state = rollback(state, lengths)
                            # rows keep only their first `lengths` [B] slots (positions move back by as much): the
                            # slots beyond are marked unused and are simply overwritten by the next extend
    state, out, steps = decode_chunk(cfg, static, layout, params, state, force_done, n_steps, width, ...)
                            # up to n_steps (traced) single-token steps for every row in one lax.while_loop with the
                            # state donated (the cache updated in place), stopping once every row is done

DecodeState (a NamedTuple: a pytree, so jit takes and donates it whole):
    cache      {"k", "v"}: per layer [B, N, S, H] (or stacked [L, B, N, S, H]; see cache.py)
    kv_valid   [B, S] bool: which slots hold real tokens (prompt padding is False)
    tokens     [B] int32: each row's last chosen token, not yet in the cache
    positions  [B] int32: its rotary position (counted over real tokens)
    lengths    [B] int32: its cache slot (= the slots used before it)
    made       [B] int32: tokens chosen so far (min_tokens and the per-row random streams count with it)
    done       [B] bool
    seen       [B, V] bool, or None without a repetition penalty: ids in the prompt or chosen
    settings   per-row sampling settings, each [B, ...]: temperature, top_p, repetition_penalty, stop_mask [B, V],
               max_new (a row is done once it made that many); the server's also top_k, min_tokens, logprobs, key
    key        one PRNG key (batch-uniform sampling: split once per step), or None (per-row keys in settings)

`uniform` (static): every row writes at the same slot (lengths all equal: generate's left-padded batch): the cache
update is one dynamic_update_slice. Otherwise each row is computed alone (vmapped) at its own slot, so rows of any
length mix (the server). Both are exact: a row's values never depend on another row's.

The sampler is sampling.choose (one for all drivers); the compiled programs live in a `Programs` cache (one per
driver instance, keyed by kind + shapes + statics, compiled ahead of time and counted).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from neox_jax.inference import sampling
from neox_jax.inference.cache import init_cache
from neox_jax.inference.decode import Layout
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import Params, is_stacked, model_from_params, positions_from_mask
from neox_jax.parallel import sharding

TOP_LOGPROBS = 5  # the most log-probabilities a row may ask for (OpenAI's limit)
# XLA CPU: with region analysis, copy insertion sees that each layer's cache update in the decode loop is the buffer's
# last use and updates it in place; without it XLA copied every cache buffer twice per step (measured in the HLO).
CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


SLOT_ROUND = 64  # cache lengths are multiples of this


def prompt_bucket(n: int, limit: int) -> int:
    """The padded prompt length for n tokens: 16, 32, 64, 128, then x1.5 / x4/3 in turn (192, 256, 384, 512, 768,
    ...), at most limit."""
    b = 16
    while b < n:
        b = b * 2 if b < 128 else (b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3)
    return min(b, limit)


def batch_bucket(n: int) -> int:
    """Rows for n prompts: the next power of two."""
    return 1 << max(0, (n - 1).bit_length())


class DecodeState(NamedTuple):
    cache: dict
    kv_valid: jax.Array
    tokens: jax.Array
    positions: jax.Array
    lengths: jax.Array
    made: jax.Array
    done: jax.Array
    seen: jax.Array | None
    settings: dict
    key: jax.Array | None


def constrain(state: DecodeState, mesh) -> DecodeState:
    """Pins the state on the mesh (the cache over batch and heads, every [B, ...] array over batch)."""
    return DecodeState(**sharding.constrain_state(state._asdict(), mesh)) if mesh is not None else state


def empty_state(
    cfg: NeoXConfig,
    layout: Layout,
    rows: int,
    length: int,
    settings: dict,
    stacked: bool,
    seen: bool,
    key=None,
    mesh=None,
) -> DecodeState:
    """B = rows free rows (done) of `length` cache slots; settings: [B, ...] arrays (see DecodeState). Call inside
    jit so the buffers are made where they are needed."""
    zeros = jnp.zeros(rows, jnp.int32)
    state = DecodeState(
        cache=init_cache(cfg, rows, length, layout.cache_dtype, stacked),
        kv_valid=jnp.zeros((rows, length), bool),
        tokens=zeros,
        positions=zeros,
        lengths=zeros,
        made=zeros,
        done=jnp.ones(rows, bool),
        seen=jnp.zeros((rows, cfg.vocab_size), bool) if seen else None,
        settings=jax.tree.map(jnp.asarray, settings),
        key=key,
    )
    return constrain(state, mesh)


def _choose(static, layout, settings, logits, state_key, seen, made):
    """sampling.choose over state settings; returns (tokens, the state's next key)."""
    if static.per_row:
        tokens = sampling.choose(static, settings, logits, settings["key"], seen, made, vocab_major=layout.transposed)
        return tokens, state_key
    key, sub = jax.random.split(state_key) if not static.greedy else (state_key, None)
    return sampling.choose(static, settings, logits, sub, seen, vocab_major=layout.transposed), key


def _logprobs(static, want, logits, tokens):
    """(logprob [B], top ids [B, K], top logprobs [B, K]) behind a runtime switch: only when some row asked (a top-k
    over the vocabulary cost ~10% of a step)."""
    b = logits.shape[0]
    k = TOP_LOGPROBS

    def none(_):
        return jnp.zeros(b, jnp.float32), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32)

    return jax.lax.cond(
        jnp.any(want), lambda x: sampling.logprobs(x, tokens, k, static.vocab_limit, static.logprob_rows), none, logits
    )


def prefill_into(cfg, static, layout, params, state: DecodeState, row0, ids, mask, settings=None, mesh=None):
    """Prompts ids, mask [R, P] (1 = real token; left or right padding) into rows row0..row0+R-1 of state (slots
    0..P-1 of their caches), with their settings ([R, ...], None: keep the state's) and their first chosen tokens.
    Returns (state, hidden [R, P, D] final-layernormed, first {"tokens" [R], "logprobs", "top_ids", "top_logprobs"}
    (log-probabilities when static.per_row and the row asked, else zeros))."""
    r, p = ids.shape
    s = state.kv_valid.shape[1]
    model = model_from_params(cfg, params, layout.transposed, layout.attention)
    valid = mask.astype(bool)
    positions = positions_from_mask(mask)  # [R, P] rotary positions of the real tokens
    stacked = is_stacked(params)
    cache = init_cache(cfg, r, p, layout.cache_dtype, stacked)
    hidden, cache = model.hidden_states(ids, positions, valid, cache, 0)  # [R, P, D]
    lengths = p - jnp.argmax(valid[:, ::-1], axis=1).astype(jnp.int32)  # last real slot + 1
    m = layout.min_rows  # the logits of the last m positions (a layout may want more than one row)
    start = jnp.clip(lengths - m, 0, p - m)  # [R]
    last = jnp.take_along_axis(hidden, (start[:, None] + jnp.arange(m))[..., None], axis=1)  # [R, m, D]
    logits = jnp.take_along_axis(model.logits(last), (lengths - 1 - start)[:, None, None], axis=1)[:, 0]  # [R, V]
    if settings is None:
        settings = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, row0, r), state.settings)
    seen = sampling.prompt_seen(ids, mask, cfg.vocab_size) if state.seen is not None else None
    tokens, key = _choose(static, layout, settings, logits, state.key, seen, jnp.zeros(r, jnp.int32))
    first = {"tokens": tokens}
    if static.per_row:
        first["logprobs"], first["top_ids"], first["top_logprobs"] = _logprobs(
            static, settings["logprobs"], logits, tokens
        )
    at = (0, row0, 0, 0, 0) if stacked else (row0, 0, 0, 0)

    def put(big, small):  # rows row0.. of a [B, ...] array
        return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (row0,) + (0,) * (small.ndim - 1))

    stop = settings["stop_mask"][jnp.arange(r), tokens] | (settings["max_new"] <= 1)
    state = DecodeState(
        cache=jax.tree.map(lambda b, c: jax.lax.dynamic_update_slice(b, c.astype(b.dtype), at), state.cache, cache),
        kv_valid=put(state.kv_valid, jnp.pad(valid, ((0, 0), (0, s - p)))),
        tokens=put(state.tokens, tokens),
        positions=put(state.positions, jnp.sum(mask, axis=1, dtype=jnp.int32)),
        lengths=put(state.lengths, lengths),
        made=put(state.made, jnp.ones(r, jnp.int32)),
        done=put(state.done, stop),
        seen=None if seen is None else put(state.seen, sampling.mark_seen(seen, tokens)),
        settings=jax.tree.map(put, state.settings, settings),
        key=key,
    )
    return constrain(state, mesh), hidden, first


def extend(cfg, layout, params, state: DecodeState, ids, uniform: bool, live=None):
    """ids [B, T] at each row's next T slots (see the module docstring); live [B] bool: rows that advance (None:
    all; the others' slots are written but not marked used, and their lengths stay). Returns (state, logits
    [B, T, V] float32)."""
    model = model_from_params(cfg, params, layout.transposed)
    b, t = ids.shape
    pos = state.positions[:, None] + jnp.arange(t)  # [B, T]
    adv = t if live is None else jnp.where(live, t, 0)
    if uniform:  # one slot for every row
        idx = state.lengths[0]
        kv_valid = jax.lax.dynamic_update_slice(state.kv_valid, jnp.ones((b, t), bool), (0, idx))
        hidden, cache = model.hidden_states(ids, pos, kv_valid, state.cache, idx)  # [B, T, D]
    else:  # each row alone (vmapped) at its own slot
        axis = 1 if is_stacked(params) else 0  # the batch axis of the cache buffers
        slots = state.lengths[:, None] + jnp.arange(t)  # [B, T]
        mark = jnp.ones((b, t), bool) if live is None else jnp.broadcast_to(live[:, None], (b, t))
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
        kv_valid = state.kv_valid.at[rows, slots].set(state.kv_valid[rows, slots] | mark)

        def one_row(tok, p, slot, valid, cache):
            cache = jax.tree.map(lambda x: jnp.expand_dims(x, axis), cache)
            hidden, cache = model.hidden_states(tok[None], p[None], valid[None], cache, slot)
            return hidden[0], jax.tree.map(lambda x: jnp.squeeze(x, axis), cache)

        hidden, cache = jax.vmap(one_row, in_axes=(0, 0, 0, 0, axis), out_axes=(0, axis))(
            ids, pos, state.lengths, kv_valid, state.cache
        )  # [B, T, D]
    logits = model.logits(hidden)  # [B, T, V] float32
    state = state._replace(cache=cache, kv_valid=kv_valid, positions=state.positions + adv, lengths=state.lengths + adv)
    return state, logits


def rollback(state: DecodeState, lengths) -> DecodeState:
    """Each row keeps its first lengths [B] slots; positions move back with them (rejected draft tokens)."""
    s = state.kv_valid.shape[1]
    back = state.lengths - lengths
    kv_valid = state.kv_valid & (jnp.arange(s)[None] < lengths[:, None])
    return state._replace(kv_valid=kv_valid, lengths=lengths, positions=state.positions - back)


def decode_chunk(
    cfg, static, layout, params, state: DecodeState, force_done, n_steps, width: int, uniform: bool, mesh=None
):
    """Up to n_steps (traced, <= width) single-token steps. out["tokens"][:, i] is the token chosen at step i (rows
    already done repeat their last token); with static.per_row also "logprobs", "top_ids", "top_logprobs". steps:
    how many steps ran. The caller keeps lengths + n_steps <= S."""
    b = state.tokens.shape[0]
    rows_ix = jnp.arange(b)

    def cond(carry):
        i, st, _ = carry
        return (i < n_steps) & ~jnp.all(st.done)

    def body(carry):
        i, st, out = carry
        live = ~st.done
        st, logits = extend(cfg, layout, params, st, st.tokens[:, None], uniform, None if uniform else live)
        logits = logits[:, 0]  # [B, V]
        tokens, key = _choose(static, layout, st.settings, logits, st.key, st.seen, st.made)
        tokens = jnp.where(live, tokens, st.tokens)
        made = st.made + live
        stop = st.settings["stop_mask"][rows_ix, tokens] | (made >= st.settings["max_new"])
        seen = None
        if st.seen is not None:
            seen = st.seen.at[rows_ix, tokens].set(st.seen[rows_ix, tokens] | live)
        new = {"tokens": tokens}
        if static.per_row:
            new["logprobs"], new["top_ids"], new["top_logprobs"] = _logprobs(
                static, st.settings["logprobs"], logits, tokens
            )
        out = {k: jax.lax.dynamic_update_index_in_dim(out[k], v, i, axis=1) for k, v in new.items()}
        st = st._replace(tokens=tokens, made=made, done=st.done | (live & stop), seen=seen, key=key)
        return i + 1, constrain(st, mesh), out

    out = {"tokens": jnp.zeros((b, width), jnp.int32)}
    if static.per_row:
        out["logprobs"] = jnp.zeros((b, width), jnp.float32)
        out["top_ids"] = jnp.zeros((b, width, TOP_LOGPROBS), jnp.int32)
        out["top_logprobs"] = jnp.zeros((b, width, TOP_LOGPROBS), jnp.float32)
    state = constrain(state._replace(done=state.done | force_done), mesh)
    steps, state, out = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), state, out))
    return constrain(state, mesh), out, steps


class Programs:
    """One driver's compile cache: key -> compiled program (AOT, with the CPU options), counted."""

    def __init__(self):
        self._compiled: dict = {}
        self.compiles = 0  # programs compiled (tests check it stays put after warm-up)

    def __contains__(self, key) -> bool:
        return key in self._compiled

    def __len__(self) -> int:
        return len(self._compiled)

    def values(self) -> list:
        """The compiled programs, in the order they were first asked for."""
        return list(self._compiled.values())

    def get(self, key, jitted, *args, **kwargs):
        """The compiled `jitted` for key, lowered with args the first time."""
        if key not in self._compiled:
            opts = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else {}
            self._compiled[key] = jitted.lower(*args, **kwargs).compile(compiler_options=opts)
            self.compiles += 1
        return self._compiled[key]


def params_key(params: Params) -> tuple:
    """What of the params shapes a program (new params of another shape / dtype / sharding: recompile)."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


def round_rows(n: int, min_rows: int, mesh) -> int:
    """Rows for a program of n rows: at least min_rows (Layout.min_rows), a multiple of the mesh's batch split."""
    n = max(n, min_rows)
    d = sharding.data_size(mesh)
    return -(-n // d) * d
