"""Speculative decoding, compiled, as a driver of the decode core (core.py): a small draft model proposes k tokens,
the target scores all k+1 positions in one `extend`, and the tokens the target agrees with are kept (Leviathan et al.
2023, Chen et al. 2023). Two programs:

    prefill(cfg, draft_cfg, static, layout, draft_layout, cache_len, params, draft_params, ids, mask, settings, key)
        -> state: both models' prompts through core.empty_state + prefill_into (the target's first token chosen).
    rounds(cfg, draft_cfg, static, layout, draft_layout, k, params, draft_params, state, values, force_done, n_rounds)
        -> (state, out {"tokens": [B, S], ...}, count [B], rounds_run)
        a lax.while_loop of up to n_rounds rounds (stopping once every row is done): k draft steps (core.extend on
        the draft's own state), one core.extend of k+1 tokens on the target's, the acceptance rule, per row, then
        core.rollback of the target to the kept tokens. out["tokens"][b, :count[b]] are the tokens row b made in
        this call.

Two sampling modes. Batch-uniform (generate): one Static + values for every row and one PRNG key. Per row (the
server, static.per_row, values None): each row's temperature (0: greedy), top_k, top_p and min_tokens from the
state's settings, its draws from its own seed folded with the tokens it has made (so a row's output never depends on
the rows beside it), and the log-probabilities of the kept tokens from the target's logits.

Both states keep the same slots (same prompt bucket): a row's target.tokens is its last chosen token, in neither
cache yet, at slot target.lengths. Rolling back is core.rollback: the rejected slots are marked unused and the next
round overwrites them; no cache is copied. The draft is fed every token it proposes, the k-th too (its logits
unused), so after any round it holds every kept token: each round rolls it back to the target's length and feeds one
token, the last chosen one (k+1 single-token draft steps a round; feeding two tokens at once instead cost as much as
four single ones on XLA CPU). At batch 1 every write is the uniform in-place one (core.extend uniform); more rows each
write at their own slot.

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
    proposed: jax.Array  # [B] drafts proposed (statistics)
    accepted: jax.Array  # [B] drafts accepted
    steps: jax.Array  # [B] target forwards


def _constrain(state: SpecState, mesh) -> SpecState:
    if mesh is None:
        return state
    rest = sharding.constrain_state({k: getattr(state, k) for k in ("proposed", "accepted", "steps")}, mesh)
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


ACCEPT_SALT, FIX_SALT = 0x7FFFFFFF, 0x7FFFFFFE  # fold_in data for the per-row accept / correction draws


def _blocked(settings, logits, made):
    """Per row: logits [B, T, U] of the tokens made + t (t < T) with the stop ids at -inf before min_tokens (what
    sampling.choose does for the server)."""
    n = made[:, None] + jnp.arange(logits.shape[1])  # [B, T] index of the token chosen from each position
    block = (n < settings["min_tokens"][:, None])[..., None] & settings["stop_mask"][:, None, : logits.shape[-1]]
    return jnp.where(block, -jnp.inf, logits)


def _processed_rows(static, settings, x):
    """x [B, T, U] -> the logits each row draws from (its own temperature, top_k, top_p), [B, T, U]."""
    b, t, u = x.shape
    vals = {k: jnp.repeat(settings[k], t, axis=0) for k in ("temperature", "top_p", "top_k")}
    return sampling.processed_logits(static, vals, x.reshape(b * t, u)).reshape(b, t, u)


def _draft_rows(static, settings, logits, kd, made, sampled):
    """The server's draft choice, per row: logits [B, U] of token `made` [B]; kd [B, 2] the row's round key data;
    sampled: whether any row samples (else no sort at all). -> (tokens [B], the logits drawn from [B, U])."""
    x = _blocked(settings, logits[:, None], made)[:, 0]
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def sample(x):
        q = _processed_rows(static, settings, x[:, None])[:, 0]
        tok = sampling.draw(kd, q, made).astype(jnp.int32)
        return jnp.where(settings["temperature"] > 0, tok, greedy), q

    return jax.lax.cond(sampled, sample, lambda x: (greedy, x), x)


def accept_rows(static, settings, drafts, draft_logits, target_logits, made, kd, sampled):
    """accept() with each row's own settings (the server): a row with temperature 0 keeps the drafts equal to the
    target's argmax, the others the rejection rule over their own processed distributions. draft_logits [B, k, U]
    (what _draft_rows drew from), target_logits [B, k+1, U] raw, made [B] (the tokens made before this round's
    first), kd [B, 2] the rows' round key data. -> (emitted [B, k+1], n [B])."""
    b, k = drafts.shape
    x = _blocked(settings, target_logits, made)
    best = jnp.argmax(x, axis=-1).astype(jnp.int32)  # [B, k+1]
    n_greedy = jnp.sum(jnp.cumprod(drafts == best[:, :k], axis=1), axis=1).astype(jnp.int32)

    def sample(x):
        p = jax.nn.softmax(_processed_rows(static, settings, x), axis=-1)  # [B, k+1, U]
        q = jax.nn.softmax(draft_logits, axis=-1)  # [B, k, U]
        p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(sampling.row_keys(kd, ACCEPT_SALT))
        n = jnp.sum(jnp.cumprod(u * q_d < p_d, axis=1), axis=1).astype(jnp.int32)
        residual = jnp.concatenate([jnp.maximum(p[:, :k] - q, 0.0), p[:, k:]], axis=1)  # [B, k+1, U]
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)
        fix = jax.vmap(lambda key, r: jax.random.categorical(key, jnp.log(r), axis=-1))(
            sampling.row_keys(kd, FIX_SALT), residual
        )
        j = jnp.arange(k + 1)[None, :]
        emitted = jnp.where(j < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), jnp.where(j == n[:, None], fix, 0))
        on = settings["temperature"] > 0
        return jnp.where(on[:, None], emitted.astype(jnp.int32), best), jnp.where(on, n, n_greedy)

    return jax.lax.cond(sampled, sample, lambda x: (best, n_greedy), x)


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
    return _constrain(SpecState(both[0], both[1], zeros, zeros, zeros), mesh)


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
    width: int | None = None,
    uniform: bool | None = None,
):
    """Up to n_rounds rounds; a row is done at a stop id (settings stop_mask) or once it made settings max_new tokens
    (exactly: a round's surplus is dropped). values: the batch's sampling scalars (SamplingParams.values()), or None
    with static.per_row (the server): then every row samples with its own settings (state.target.settings:
    temperature, top_k, top_p, min_tokens, key) and out also has the log-probabilities of the kept tokens under the
    target ("logprobs", "top_ids", "top_logprobs", behind a runtime switch: only when a row asked). Returns (state,
    out {"tokens": [B, width], ...}, count [B], rounds_run); width: out's columns (default: the cache length).
    uniform: every row at one slot (default: batch 1). The caller keeps cache_len >= P + max_new + k."""
    u = static.vocab_limit
    per_row = static.per_row
    b, s = state.target.kv_valid.shape
    width = s if width is None else width
    uniform = b == 1 if uniform is None else uniform  # one row: its slot is every row's, the in-place update
    rows = jnp.arange(b)
    settings = state.target.settings
    limit = settings["max_new"]  # [B]
    stop_mask = settings["stop_mask"]  # [B, V]
    sampled = jnp.any(settings["temperature"] > 0) if per_row else None  # some row samples (per_row)

    def choose(logits, key, made):  # the draft's choice: (tokens [B], the logits drawn from [B, U], key)
        if per_row:
            return (*_draft_rows(static, settings, logits, key, made, sampled), key)
        key, sub = jax.random.split(key)
        return sampling.choose(static, values, logits, sub), logits, key

    def propose(st: SpecState, key):
        """k draft tokens [B, k], the logits they came from [B, k, U] and the draft's state."""
        t = st.target
        dst = core.rollback(st.draft, t.lengths)  # the draft holds every kept token (see the module docstring)
        dst, logits = core.extend(draft_cfg, draft_layout, draft_params, dst, t.tokens[:, None], uniform)
        logits = _over(logits[:, 0], u)  # [B, U]

        def step(carry, i):
            dst, logits, key = carry
            tok, drawn, key = choose(logits, key, t.made + i)
            dst, nxt = core.extend(draft_cfg, draft_layout, draft_params, dst, tok[:, None], uniform)
            return (dst, _over(nxt[:, 0], u), key), (tok, drawn)

        # k-1 fed drafts (the last one is scored by the target only), then the k-th draw
        (dst, logits, key), (toks, lgs) = jax.lax.scan(step, (dst, logits, key), jnp.arange(k - 1), unroll=True)
        if per_row:
            last, dlast = _draft_rows(static, settings, logits, key, t.made + k - 1, sampled)
        else:
            last, dlast = sampling.choose(static, values, logits, key), logits
        # fed too, for its cache only (after a fully accepted round the next one starts past it)
        dst, _ = core.extend(draft_cfg, draft_layout, draft_params, dst, last[:, None], uniform)
        drafts = jnp.concatenate([toks.T, last[:, None]], axis=1) if k > 1 else last[:, None]
        dlogits = jnp.concatenate([lgs.transpose(1, 0, 2), dlast[:, None]], axis=1) if k > 1 else dlast[:, None]
        return drafts.astype(jnp.int32), dlogits, dst

    def cond(carry):
        i, st, _, _ = carry
        return (i < n_rounds) & ~jnp.all(st.target.done)

    def body(carry):
        i, st, out, count = carry
        t = st.target
        made0, live = t.made, ~t.done
        if per_row:  # each row's round key: its seed folded with the tokens it has made (never its company)
            key = None
            k_draft = k_acc = jax.random.key_data(sampling.row_keys(settings["key"], made0))
        else:
            key, k_draft, k_acc = jax.random.split(t.key, 3)
        drafts, dlogits, dst = propose(st, k_draft)
        idx = t.lengths
        fed = jnp.concatenate([t.tokens[:, None], drafts], axis=1)  # [B, k+1] at slots lengths..lengths+k
        t, logits = core.extend(cfg, layout, params, t, fed, uniform)  # logits [B, k+1, V]
        if per_row:
            emitted, n = accept_rows(static, settings, drafts, dlogits, _over(logits, u), made0, k_acc, sampled)
        else:
            emitted, n = accept(static, values, drafts, dlogits, _over(logits, u), k_acc)
        # how many of the k+1 this row keeps: up to the first stop id, at most limit - made, none once done
        j = jnp.arange(k + 1)[None, :]
        stops = jnp.take_along_axis(stop_mask, emitted, axis=1)  # [B, k+1]
        stop_at = jnp.where((j <= n[:, None]) & stops, j, k + 1).min(axis=1)  # [B] (k+1: none)
        c = jnp.minimum(jnp.minimum(n + 1, stop_at + 1), limit - t.made)
        c = jnp.where(live, c, 0)
        last = jnp.take_along_axis(emitted, jnp.maximum(c - 1, 0)[:, None], axis=1)[:, 0]
        cols = jnp.where(j < c[:, None], count[:, None] + j, width)  # [B, k+1]; width: dropped
        new = {"tokens": emitted}
        if per_row:
            want = jnp.any(settings["logprobs"] & live)
            flat = core._logprobs(static, want, logits.reshape(b * (k + 1), -1), emitted.reshape(-1))
            new["logprobs"], new["top_ids"], new["top_logprobs"] = (x.reshape(b, k + 1, *x.shape[1:]) for x in flat)
        out = {name: out[name].at[rows[:, None], cols].set(v, mode="drop") for name, v in new.items()}
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
            proposed=st.proposed + jnp.where(live, k, 0),
            accepted=st.accepted + jnp.where(live, n, 0),
            steps=st.steps + live.astype(jnp.int32),
        )
        return i + 1, _constrain(new, mesh), out, count + c

    t = state.target
    state = _constrain(state._replace(target=t._replace(done=t.done | force_done | (t.made >= limit))), mesh)
    zero = jnp.asarray(0, jnp.int32)
    out = {"tokens": jnp.zeros((b, width), jnp.int32)}
    if per_row:
        out["logprobs"] = jnp.zeros((b, width), jnp.float32)
        out["top_ids"] = jnp.zeros((b, width, core.TOP_LOGPROBS), jnp.int32)
        out["top_logprobs"] = jnp.zeros((b, width, core.TOP_LOGPROBS), jnp.float32)
    ran, state, out, count = jax.lax.while_loop(cond, body, (zero, state, out, jnp.zeros((b,), jnp.int32)))
    return state, out, count, ran


prefill_jit = jax.jit(prefill, static_argnums=(0, 1, 2, 3, 4, 5), static_argnames=("mesh",))
rounds_jit = jax.jit(
    rounds, static_argnums=(0, 1, 2, 3, 4, 5), static_argnames=("mesh", "width", "uniform"), donate_argnums=(8,)
)
