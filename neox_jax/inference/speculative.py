"""Speculative decoding, compiled: a small draft model proposes k tokens, the target scores all k+1 positions in one
forward, and the tokens the target agrees with are kept (Leviathan et al. 2023, Chen et al. 2023). Two programs:

    prefill(cfg, draft_cfg, static, layout, draft_layout, cache_len, out_batch, params, draft_params, ids, mask, values,
            stop_mask, key) -> state
        the target's prefill (decode.prefill: the first token) and the draft's prompt forward into its own cache.
    rounds(cfg, draft_cfg, static, layout, draft_layout, k, params, draft_params, state, values, stop_mask, force_done,
           limit, n_rounds) -> (state, out [B, S], count [B], rounds_run)
        a lax.while_loop of up to n_rounds rounds (stopping once every row is done): k draft steps, one target forward
        of k+1 tokens, the acceptance rule, per row. out[b, :count[b]] are the tokens row b made in this call.

Both caches keep the target's slot layout (same prompt bucket, same slots) with a per-row index (model.neox
write_slots): a row's tokens, index [B], is its last chosen token, not yet in either cache, and the slots before
index hold its past. Rolling a row back after a rejection is moving its index: the rejected slots are masked out
(the model reads only slots < index) and the next round overwrites them. No cache is copied. The draft may lack the
token at slot index-1 (the last draft of a fully accepted round was never fed to it), so its first step of each round
feeds two tokens, the one at index-1 and the last chosen one; rewriting a slot the draft already has is harmless.

Acceptance, per row: greedy keeps the longest prefix of drafts equal to the target's argmax, then the target's own
token (so the output is the target's greedy output). Sampling accepts draft d_i with probability min(1, p_i(d_i) /
q_i(d_i)) and at the first rejection draws from max(0, p_i - q_i) renormalised (after k acceptances: from p_{k+1}),
where p and q are the target's and draft's distributions after temperature / top-k / top-p: the output follows the
target's distribution exactly. Both are over the first `static.vocab_limit` ids (the tokenizer's), whatever the
models' embedding row counts.

state: {"cache", "draft_cache", "kv_valid" [B, S] (prompt padding False, every generated slot True), "tokens" [B],
"prev" [B] (the token at slot index-1), "index" [B], "offset" [B] (slot - rotary position), "made" [B] (tokens out,
the prefill's first included), "done" [B], "key", "proposed" [B], "accepted" [B], "steps" [B] (target forwards)}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neox_jax.inference import decode as core
from neox_jax.inference import sampling
from neox_jax.inference.cache import init_cache
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import Params, is_stacked, model_from_params, positions_from_mask
from neox_jax.parallel import sharding

F32 = jnp.float32


def processed_logits(static: sampling.Static, values: dict, logits):
    """logits [..., U] float32 -> the logits sampling.choose samples from (temperature, top-k, top-p applied; the
    excluded ids -inf): their softmax is the distribution `choose` draws from."""
    shape, v = logits.shape, logits.shape[-1]
    logits = logits.reshape(-1, v) / values["temperature"]
    if static.top_k or static.top_p:  # as sampling.choose: the top k candidates, then the top-p prefix of them
        cand, ids = jax.lax.top_k(logits, static.top_k or v)  # [M, K]
        if static.top_p:
            probs = jax.nn.softmax(cand, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs
            cand = jnp.where(before < values["top_p"], cand, -jnp.inf)
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = jnp.full_like(logits, -jnp.inf).at[rows, ids].set(cand)
    return logits.reshape(shape)


def accept(static: sampling.Static, values: dict, drafts, draft_logits, target_logits, key):
    """drafts [B, k] (the draft's proposals), draft_logits [B, k, U] (what they were drawn from), target_logits
    [B, k+1, U] -> (emitted [B, k+1], n [B]): row b keeps emitted[b, :n[b]+1] (n[b] accepted drafts, then the
    target's token)."""
    b, k = drafts.shape
    if static.greedy:
        best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, k+1]
        n = jnp.sum(jnp.cumprod(drafts == best[:, :k], axis=1), axis=1)
        return best, n.astype(jnp.int32)
    p = jax.nn.softmax(processed_logits(static, values, target_logits), axis=-1)  # [B, k+1, U]
    q = jax.nn.softmax(processed_logits(static, values, draft_logits), axis=-1)  # [B, k, U]
    k_acc, k_res = jax.random.split(key)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    ok = jax.random.uniform(k_acc, (b, k)) * q_d < p_d  # u < p/q without dividing by a q of 0
    n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    # one correction draw per position: max(0, p_i - q_i) for i < k, p_k after every draft was accepted
    residual = jnp.concatenate([jnp.maximum(p[:, :k] - q, 0.0), p[:, k:]], axis=1)  # [B, k+1, U]
    total = residual.sum(-1, keepdims=True)
    residual = jnp.where(total > 0, residual, p)  # p == q to rounding at a rejected id: p itself is exact
    fix = jax.random.categorical(k_res, jnp.log(residual), axis=-1).astype(jnp.int32)  # [B, k+1]
    j = jnp.arange(k + 1)[None, :]
    emitted = jnp.where(j < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), jnp.where(j == n[:, None], fix, 0))
    return emitted.astype(jnp.int32), n


def _over(logits, u: int):
    """[..., V] -> [..., U]: the first u ids (a draft with fewer rows would be refused by the driver)."""
    return logits[..., :u]


def _pin_cache(cache, mesh):
    return sharding.constrain_state({"cache": cache}, mesh)["cache"]


def prefill(
    cfg: NeoXConfig,
    draft_cfg: NeoXConfig,
    static: sampling.Static,
    layout: core.Layout,
    draft_layout: core.Layout,
    cache_len: int,
    out_batch: int,
    params: Params,
    draft_params: Params,
    ids,
    mask,
    values,
    stop_mask,
    key,
    mesh=None,
) -> dict:
    """ids, mask [B, P] (left padding) -> the speculative state holding the target's first chosen token."""
    p = ids.shape[1]
    st = core.prefill(cfg, static, layout, cache_len, out_batch, params, ids, mask, values, stop_mask, key, mesh)
    draft = model_from_params(draft_cfg, draft_params, draft_layout.transposed, draft_layout.attention)
    dcache = init_cache(draft_cfg, out_batch, cache_len, draft_layout.cache_dtype, is_stacked(draft_params))
    kv_prompt = jnp.pad(mask.astype(bool), ((0, 0), (0, cache_len - p)))
    _, dcache = draft.hidden_states(ids, positions_from_mask(mask), kv_prompt, dcache, 0)  # rows 0..B-1 written
    b = out_batch
    prev = jnp.concatenate([ids[:, -1], jnp.repeat(ids[:1, -1], b - ids.shape[0])])
    index = jnp.full((b,), p, jnp.int32)
    state = {
        "cache": st["cache"],
        "draft_cache": _pin_cache(dcache, mesh),
        "kv_valid": st["kv_valid"] | (jnp.arange(cache_len) >= p)[None, :],
        "tokens": st["tokens"],
        "prev": prev.astype(jnp.int32),
        "index": index,
        "offset": index - st["positions"],
        "made": jnp.ones((b,), jnp.int32),
        "done": st["done"],
        "key": st["key"],
        **{name: jnp.zeros((b,), jnp.int32) for name in ("proposed", "accepted", "steps")},
    }
    return _constrain(state, mesh)


def _constrain(state, mesh):
    rest = sharding.constrain_state({k: v for k, v in state.items() if k != "draft_cache"}, mesh)
    return {**rest, "draft_cache": _pin_cache(state["draft_cache"], mesh)}


def rounds(
    cfg: NeoXConfig,
    draft_cfg: NeoXConfig,
    static: sampling.Static,
    layout: core.Layout,
    draft_layout: core.Layout,
    k: int,
    params: Params,
    draft_params: Params,
    state: dict,
    values,
    stop_mask,
    force_done,
    limit,
    n_rounds,
    mesh=None,
):
    """Up to n_rounds rounds; a row is done at a stop id or once it made `limit` tokens (exactly: a round's surplus is
    dropped). The caller keeps cache_len >= P + limit + k."""
    target = model_from_params(cfg, params, layout.transposed)
    draft = model_from_params(draft_cfg, draft_params, draft_layout.transposed)
    u = static.vocab_limit
    b, s = state["kv_valid"].shape
    rows = jnp.arange(b)

    def propose(st, key):
        """k draft tokens [B, k] and the logits they came from [B, k, U]."""
        idx, off, kv = st["index"], st["offset"], st["kv_valid"]
        two = jnp.stack([st["prev"], st["tokens"]], axis=1)  # [B, 2] at slots index-1, index
        pos = (idx - off)[:, None] + jnp.arange(-1, 1)
        hidden, dcache = draft.hidden_states(two, pos, kv, st["draft_cache"], idx - 1)
        logits = _over(draft.logits(hidden[:, -1:]), u)[:, 0]  # [B, U]

        def step(carry, j):
            dcache, logits, key = carry
            key, sub = jax.random.split(key)
            tok = sampling.choose(static, values, logits, sub)  # [B]
            h, dcache = draft.hidden_states(tok[:, None], (idx - off + j)[:, None], kv, dcache, idx + j)
            return (dcache, _over(draft.logits(h), u)[:, 0], key), (tok, logits)

        # k-1 fed drafts (the last one is scored by the target only), then the k-th draw
        (dcache, logits, key), (toks, lgs) = jax.lax.scan(step, (dcache, logits, key), jnp.arange(1, k))
        last = sampling.choose(static, values, logits, key)
        drafts = jnp.concatenate([toks.T, last[:, None]], axis=1) if k > 1 else last[:, None]
        dlogits = jnp.concatenate([lgs.transpose(1, 0, 2), logits[:, None]], axis=1) if k > 1 else logits[:, None]
        return drafts.astype(jnp.int32), dlogits, dcache

    def cond(carry):
        i, st, _, _ = carry
        return (i < n_rounds) & ~jnp.all(st["done"])

    def body(carry):
        i, st, out, count = carry
        key, k_draft, k_acc = jax.random.split(st["key"], 3)
        drafts, dlogits, dcache = propose(st, k_draft)
        idx, off = st["index"], st["offset"]
        fed = jnp.concatenate([st["tokens"][:, None], drafts], axis=1)  # [B, k+1] at slots index..index+k
        hidden, cache = target.hidden_states(
            fed, (idx - off)[:, None] + jnp.arange(k + 1), st["kv_valid"], st["cache"], idx
        )
        emitted, n = accept(static, values, drafts, dlogits, _over(target.logits(hidden), u), k_acc)
        # how many of the k+1 this row keeps: up to the first stop id, at most limit - made, none once done
        j = jnp.arange(k + 1)[None, :]
        stop_at = jnp.where((j <= n[:, None]) & stop_mask[emitted], j, k + 1).min(axis=1)  # [B] (k+1: none)
        c = jnp.minimum(jnp.minimum(n + 1, stop_at + 1), limit - st["made"])
        live = ~st["done"]
        c = jnp.where(live, c, 0)
        last = jnp.take_along_axis(emitted, jnp.maximum(c - 1, 0)[:, None], axis=1)[:, 0]
        before = jnp.take_along_axis(emitted, jnp.maximum(c - 2, 0)[:, None], axis=1)[:, 0]
        cols = jnp.where(j < c[:, None], count[:, None] + j, s)  # [B, k+1]; s: dropped
        out = out.at[rows[:, None], cols].set(emitted, mode="drop")
        made = st["made"] + c
        new = {
            "cache": cache,
            "draft_cache": dcache,
            "kv_valid": st["kv_valid"],
            "tokens": jnp.where(c > 0, last, st["tokens"]),
            "prev": jnp.where(c > 1, before, jnp.where(c == 1, st["tokens"], st["prev"])),
            "index": idx + c,
            "offset": off,
            "made": made,
            "done": st["done"] | (live & ((stop_at < c) | (made >= limit))),
            "key": key,
            "proposed": st["proposed"] + jnp.where(live, k, 0),
            "accepted": st["accepted"] + jnp.where(live, n, 0),
            "steps": st["steps"] + live.astype(jnp.int32),
        }
        return i + 1, _constrain(new, mesh), out, count + c

    state = _constrain({**state, "done": state["done"] | force_done | (state["made"] >= limit)}, mesh)
    zero = jnp.asarray(0, jnp.int32)
    ran, state, out, count = jax.lax.while_loop(
        cond, body, (zero, state, jnp.zeros((b, s), jnp.int32), jnp.zeros((b,), jnp.int32))
    )
    return state, out, count, ran


prefill_jit = jax.jit(prefill, static_argnums=(0, 1, 2, 3, 4, 5, 6), static_argnames=("mesh",))
rounds_jit = jax.jit(rounds, static_argnums=(0, 1, 2, 3, 4, 5), static_argnames=("mesh",), donate_argnums=(8,))
