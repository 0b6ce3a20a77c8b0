"""Speculative decoding, compiled, as a driver of the decode core (core.py): a small draft model proposes k tokens,
the target scores all k+1 positions in one `extend`, and the tokens the target agrees with are kept (Leviathan et al.
2023, Chen et al. 2023). Two programs:

    prefill(cfg, draft_cfg, static, layout, draft_layout, cache_len, params, draft_params, ids, mask, settings, key)
        -> state: both models' prompts through core.empty_state + prefill_into (the target's first token chosen).
    rounds(cfg, draft_cfg, static, layout, draft_layout, k, params, draft_params, state, values, force_done, n_rounds)
        -> (state, out [B, S], count [B], rounds_run)
        a lax.while_loop of up to n_rounds rounds (stopping once every row is done): k draft steps (core.extend on
        the draft's own state), one core.extend of k+1 tokens on the target's, the acceptance rule, per row, then
        core.rollback of the target to the kept tokens. out[b, :count[b]] are the tokens row b made in this call.

Both states keep the same slots (same prompt bucket): a row's target.tokens is its last chosen token, in neither
cache yet, at slot target.lengths. Rolling back is core.rollback: the rejected slots are marked unused and the next
round overwrites them; no cache is copied. The draft may lack the token at slot lengths-1 (the last draft of a fully
accepted round was never fed to it), so each round first rolls the draft back to lengths-1 and feeds two tokens, that
one (`prev`) and the last chosen one; rewriting a slot the draft already has is harmless. At batch 1 every write is
the uniform in-place one (core.extend uniform); more rows each write at their own slot.

Acceptance, per row: greedy keeps the longest prefix of drafts equal to the target's argmax, then the target's own
token (so the output is the target's greedy output). Sampling accepts draft d_i with probability min(1, p_i(d_i) /
q_i(d_i)) and at the first rejection draws from max(0, p_i - q_i) renormalised (after k acceptances: from p_{k+1}),
where p and q are the target's and draft's distributions after temperature / top-k / top-p (sampling.processed_logits,
what sampling.choose draws from): the output follows the target's distribution exactly. Both are over the first
`static.vocab_limit` ids (the tokenizer's), whatever the models' embedding row counts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from neox_jax.inference import core, sampling
from neox_jax.inference.decode import Layout
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import Params, is_stacked
from neox_jax.parallel import sharding


class SpecState(NamedTuple):
    target: core.DecodeState  # tokens, lengths, made, done, settings (stop_mask [B, V], max_new [B]) and the key
    draft: core.DecodeState  # the draft's cache and slots (its tokens / key unused after the prefill)
    prev: jax.Array  # [B] the token at slot target.lengths - 1
    proposed: jax.Array  # [B] drafts proposed (statistics)
    accepted: jax.Array  # [B] drafts accepted
    steps: jax.Array  # [B] target forwards


def _constrain(state: SpecState, mesh) -> SpecState:
    if mesh is None:
        return state
    rest = sharding.constrain_state({k: getattr(state, k) for k in ("prev", "proposed", "accepted", "steps")}, mesh)
    return SpecState(core.constrain(state.target, mesh), core.constrain(state.draft, mesh), **rest)


def accept(static: sampling.Static, values: dict, drafts, draft_logits, target_logits, key):
    """drafts [B, k] (the draft's proposals), draft_logits [B, k, U] (what they were drawn from), target_logits
    [B, k+1, U] -> (emitted [B, k+1], n [B]): row b keeps emitted[b, :n[b]+1] (n[b] accepted drafts, then the
    target's token)."""
    b, k = drafts.shape
    if static.greedy:
        best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, k+1]
        n = jnp.sum(jnp.cumprod(drafts == best[:, :k], axis=1), axis=1)
        return best, n.astype(jnp.int32)
    p = jax.nn.softmax(sampling.processed_logits(static, values, target_logits), axis=-1)  # [B, k+1, U]
    q = jax.nn.softmax(sampling.processed_logits(static, values, draft_logits), axis=-1)  # [B, k, U]
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


def prefill(
    cfg: NeoXConfig,
    draft_cfg: NeoXConfig,
    static: sampling.Static,
    layout: Layout,
    draft_layout: Layout,
    cache_len: int,
    params: Params,
    draft_params: Params,
    ids,
    mask,
    settings,
    key,
    mesh=None,
) -> SpecState:
    """ids, mask [B, P] (left padding) -> the speculative state holding the target's first chosen token."""
    b = ids.shape[0]
    both = []
    for c, lay, prm, k in ((cfg, layout, params, key), (draft_cfg, draft_layout, draft_params, jax.random.key(0))):
        st = core.empty_state(c, lay, b, cache_len, settings, is_stacked(prm), False, k, mesh)
        both.append(core.prefill_into(c, static, lay, prm, st, 0, ids, mask, mesh=mesh)[0])
    zeros = jnp.zeros((b,), jnp.int32)
    return _constrain(SpecState(both[0], both[1], ids[:, -1].astype(jnp.int32), zeros, zeros, zeros), mesh)


def rounds(
    cfg: NeoXConfig,
    draft_cfg: NeoXConfig,
    static: sampling.Static,
    layout: Layout,
    draft_layout: Layout,
    k: int,
    params: Params,
    draft_params: Params,
    state: SpecState,
    values,
    force_done,
    n_rounds,
    mesh=None,
):
    """Up to n_rounds rounds; a row is done at a stop id (settings stop_mask) or once it made settings max_new tokens
    (exactly: a round's surplus is dropped). values: the batch's sampling scalars (SamplingParams.values()). The
    caller keeps cache_len >= P + max_new + k."""
    u = static.vocab_limit
    b, s = state.target.kv_valid.shape
    uniform = b == 1  # one row: its slot is every row's, the in-place dynamic_update_slice
    rows = jnp.arange(b)
    limit = state.target.settings["max_new"]  # [B]
    stop_mask = state.target.settings["stop_mask"]  # [B, V]

    def propose(st: SpecState, key):
        """k draft tokens [B, k], the logits they came from [B, k, U] and the draft's state."""
        t = st.target
        dst = core.rollback(st.draft, t.lengths - 1)
        two = jnp.stack([st.prev, t.tokens], axis=1)  # [B, 2] at slots lengths-1, lengths
        dst, logits = core.extend(draft_cfg, draft_layout, draft_params, dst, two, uniform)
        logits = _over(logits[:, -1], u)  # [B, U]

        def step(carry, _):
            dst, logits, key = carry
            key, sub = jax.random.split(key)
            tok = sampling.choose(static, values, logits, sub)  # [B]
            dst, nxt = core.extend(draft_cfg, draft_layout, draft_params, dst, tok[:, None], uniform)
            return (dst, _over(nxt[:, 0], u), key), (tok, logits)

        # k-1 fed drafts (the last one is scored by the target only), then the k-th draw
        (dst, logits, key), (toks, lgs) = jax.lax.scan(step, (dst, logits, key), None, length=k - 1)
        last = sampling.choose(static, values, logits, key)
        drafts = jnp.concatenate([toks.T, last[:, None]], axis=1) if k > 1 else last[:, None]
        dlogits = jnp.concatenate([lgs.transpose(1, 0, 2), logits[:, None]], axis=1) if k > 1 else logits[:, None]
        return drafts.astype(jnp.int32), dlogits, dst

    def cond(carry):
        i, st, _, _ = carry
        return (i < n_rounds) & ~jnp.all(st.target.done)

    def body(carry):
        i, st, out, count = carry
        t = st.target
        key, k_draft, k_acc = jax.random.split(t.key, 3)
        drafts, dlogits, dst = propose(st, k_draft)
        idx = t.lengths
        fed = jnp.concatenate([t.tokens[:, None], drafts], axis=1)  # [B, k+1] at slots lengths..lengths+k
        t, logits = core.extend(cfg, layout, params, t, fed, uniform)
        emitted, n = accept(static, values, drafts, dlogits, _over(logits, u), k_acc)
        # how many of the k+1 this row keeps: up to the first stop id, at most limit - made, none once done
        j = jnp.arange(k + 1)[None, :]
        stops = jnp.take_along_axis(stop_mask, emitted, axis=1)  # [B, k+1]
        stop_at = jnp.where((j <= n[:, None]) & stops, j, k + 1).min(axis=1)  # [B] (k+1: none)
        c = jnp.minimum(jnp.minimum(n + 1, stop_at + 1), limit - t.made)
        live = ~t.done
        c = jnp.where(live, c, 0)
        last = jnp.take_along_axis(emitted, jnp.maximum(c - 1, 0)[:, None], axis=1)[:, 0]
        before = jnp.take_along_axis(emitted, jnp.maximum(c - 2, 0)[:, None], axis=1)[:, 0]
        cols = jnp.where(j < c[:, None], count[:, None] + j, s)  # [B, k+1]; s: dropped
        out = out.at[rows[:, None], cols].set(emitted, mode="drop")
        made = t.made + c
        t = core.rollback(t, idx + c)._replace(
            tokens=jnp.where(c > 0, last, t.tokens),
            made=made,
            done=t.done | (live & ((stop_at < c) | (made >= limit))),
            key=key,
        )
        new = SpecState(
            target=t,
            draft=dst,
            prev=jnp.where(c > 1, before, jnp.where(c == 1, st.target.tokens, st.prev)),
            proposed=st.proposed + jnp.where(live, k, 0),
            accepted=st.accepted + jnp.where(live, n, 0),
            steps=st.steps + live.astype(jnp.int32),
        )
        return i + 1, _constrain(new, mesh), out, count + c

    t = state.target
    state = _constrain(state._replace(target=t._replace(done=t.done | force_done | (t.made >= limit))), mesh)
    zero = jnp.asarray(0, jnp.int32)
    ran, state, out, count = jax.lax.while_loop(
        cond, body, (zero, state, jnp.zeros((b, s), jnp.int32), jnp.zeros((b,), jnp.int32))
    )
    return state, out, count, ran


prefill_jit = jax.jit(prefill, static_argnums=(0, 1, 2, 3, 4, 5), static_argnames=("mesh",))
rounds_jit = jax.jit(rounds, static_argnums=(0, 1, 2, 3, 4, 5), static_argnames=("mesh",), donate_argnums=(8,))
