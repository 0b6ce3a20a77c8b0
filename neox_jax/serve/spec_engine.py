"""Continuous batching with a draft model (`neox-jax serve --draft`): Engine's programs, each over two decode states
(the target's and the draft's, same slots), the decode a chunk of speculative rounds (neox_jax/inference/
speculative.py, per-row mode):

    admit(P)        the target's prefill exactly as Engine's (first token, prompt log-probabilities), then the
                    draft's prefill of the same prompt into the same row of its own cache.
    decode(R, W)    up to `chunk` rounds for R compacted rows over the first W cache slots: per round the draft
                    proposes k tokens per row, the target scores the k+1 positions in one forward, each row keeps
                    the prefix its own acceptance rule allows (greedy: the target's argmax; sampling: the rejection
                    rule), and both caches roll back to the kept tokens.

Every cache has max_model_len + k slots: a round writes up to k slots past the last token kept. A row's result
depends on its own prompt, settings and seed only, as with Engine: each row is computed alone (vmapped) at its own
slot and draws from its own key folded with the tokens it has made. Greedy rows make the target's own tokens (the
plain server's); sampled rows follow the target's distribution (not the plain server's draws). Not supported: the
repetition penalty (its distribution changes along the drafted tokens; the HTTP side refuses it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.inference import core, sampling
from neox_jax.inference import speculative as spec
from neox_jax.inference.core import prompt_bucket
from neox_jax.inference.decode import layout_for, transpose_kernels
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import Params, is_stacked
from neox_jax.parallel import sharding
from neox_jax.serve import engine as E
from neox_jax.serve import rows as R


def _init_state(cfg, dcfg, layout, dlayout, slots, length, stacked, dstacked, mesh) -> spec.SpecState:
    target = E._init_state(cfg, layout, slots, length, stacked, mesh)
    # the draft's prefill only reads stop_mask / max_new (its first token is never used)
    dset = {"stop_mask": np.zeros((slots, dcfg.vocab_size), bool), "max_new": np.ones(slots, np.int32)}
    draft = core.empty_state(dcfg, dlayout, slots, length, dset, dstacked, False, None, mesh)
    zeros = jnp.zeros(slots, jnp.int32)
    return spec._constrain(spec.SpecState(target, draft, zeros, zeros, zeros), mesh)


def _admit(
    cfg, dcfg, layout, dlayout, vocab_limit, logprob_rows, mesh, params, dparams, state, ids, length, slot, row, plp
):
    """Engine's admit on the target, then the same prompt ids [1, P] (length real tokens) into the draft's row."""
    target, first = E._admit(
        cfg, layout, vocab_limit, logprob_rows, mesh, params, state.target, ids, length, slot, row, plp
    )
    mask = (jnp.arange(ids.shape[1]) < length)[None].astype(jnp.int32)
    greedy = sampling.Static(True, 0, False, False, vocab_limit)
    draft = core.prefill_into(dcfg, greedy, dlayout, dparams, state.draft, slot, ids, mask, mesh=mesh)[0]
    return spec._constrain(state._replace(target=target, draft=draft), mesh), first


def _decode(
    cfg,
    dcfg,
    layout,
    dlayout,
    vocab_limit,
    logprob_rows,
    k,
    chunk,
    width,
    mesh,
    params,
    dparams,
    state,
    rows,
    force_done,
):
    """Up to `chunk` rounds for the rows `rows` [R] over the first `width` slots of both caches (see Engine's
    _decode). -> (state, out {tokens, logprobs, top_ids, top_logprobs: [R, chunk * (k+1), ...]}, stats [3]: drafts,
    drafted tokens, accepted tokens)."""
    static = sampling.per_row_static(vocab_limit, logprob_rows)._replace(repetition_penalty=False)
    stacked, dstacked = is_stacked(params), is_stacked(dparams)
    zeros = jnp.zeros(rows.shape, jnp.int32)
    rows = E.decode_rows(rows, state.target.tokens.shape[0])
    small = spec.SpecState(
        E.take_rows(state.target, rows, width, stacked),
        E.take_rows(state.draft, rows, width, dstacked),
        zeros,
        zeros,
        zeros,
    )
    statics = (cfg, dcfg, static, layout, dlayout, k)
    small, out, _, _ = spec.rounds(
        *statics, params, dparams, small, None, force_done, chunk, mesh, width=chunk * (k + 1), uniform=False
    )
    state = state._replace(
        target=E.put_rows(state.target, small.target, rows, width, stacked),
        draft=E.put_rows(state.draft, small.draft, rows, width, dstacked),
    )
    stats = jnp.stack([small.steps.sum(), small.proposed.sum(), small.accepted.sum()])
    return spec._constrain(state, mesh), out, stats


class SpecEngine(E.Engine):
    """Engine with a draft proposing `draft_tokens` tokens a round; `chunk` counts rounds (1 to k+1 tokens a row
    each). After each decode, `spec_stats` holds that chunk's (drafts, drafted tokens, accepted tokens)."""

    def __init__(
        self,
        cfg: NeoXConfig,
        params: Params,
        *,
        draft_cfg: NeoXConfig,
        draft_params: Params,
        draft_tokens: int = 4,
        **kw,
    ):
        from neox_jax.inference.speculative_driver import MAX_DRAFT_TOKENS

        k = draft_tokens
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_DRAFT_TOKENS:
            raise ValueError(f"draft_tokens must be an int in [1, {MAX_DRAFT_TOKENS}], got {k!r}")
        super().__init__(cfg, params, **kw)
        if draft_cfg.vocab_size < self.vocab_limit:
            raise ValueError(
                f"the draft's embedding has {draft_cfg.vocab_size} rows, fewer than the {self.vocab_limit} ids the "
                f"target may emit: the draft could not read them"
            )
        if self.max_model_len > draft_cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the draft's max_position_embeddings "
                f"{draft_cfg.max_position_embeddings}"
            )
        self.k, self.draft_cfg = int(k), draft_cfg
        self.draft_layout = layout_for(draft_params, jax.default_backend())
        self.draft_params = transpose_kernels(draft_params) if self.draft_layout.transposed else draft_params
        self.slots = core.round_rows(self.slots, max(self.layout.min_rows, self.draft_layout.min_rows), self.mesh)
        self.row_buckets = E.row_buckets(self.slots, max(self.layout.min_rows, self.draft_layout.min_rows), self.mesh)
        self.cache_len = self.max_model_len + self.k
        self.length_buckets = [w for w in self.length_buckets if w < self.max_model_len] + [self.cache_len]
        self._lengths = np.zeros(self.slots, np.int64)
        self.spec_stats = (0, 0, 0)
        self.admit_rows = {p: [] for p in self.buckets}  # one prompt at a time: its admit fills the draft's cache too

    def _statics(self):
        return (self.cfg, self.draft_cfg, self.layout, self.draft_layout)

    def _init_program(self):
        st = (*self._statics(), self.slots, self.cache_len, is_stacked(self.params), is_stacked(self.draft_params))
        return self.programs.get(("init",), jax.jit(functools.partial(_init_state, *st, self.mesh)))

    def _state_for_lowering(self):
        if self.state is not None:
            return self.state
        st = (*self._statics(), self.slots, self.cache_len, is_stacked(self.params), is_stacked(self.draft_params))
        return jax.eval_shape(lambda: _init_state(*st, None))

    def _admit_program(self, p: int):
        fn = jax.jit(
            functools.partial(_admit, *self._statics(), self.vocab_limit, self.logprob_rows, self.mesh),
            donate_argnums=(2,),
        )
        row = jax.tree.map(lambda x: x[0], R.empty_rows(1, self.cfg.vocab_size))
        args = (self.params, self.draft_params, self._state_for_lowering(), jax.ShapeDtypeStruct((1, p), jnp.int32))
        return self.programs.get(("admit", p), fn, *args, np.int32(1), np.int32(0), row, np.bool_(False))

    def _decode_program(self, r: int, width: int):
        fn = jax.jit(
            functools.partial(
                _decode, *self._statics(), self.vocab_limit, self.logprob_rows, self.k, self.chunk, width, self.mesh
            ),
            donate_argnums=(2,),
        )
        rows = jnp.arange(r, dtype=jnp.int32)
        args = (self.params, self.draft_params, self._state_for_lowering(), rows, np.zeros(r, bool))
        return self.programs.get(("decode", r, width), fn, *args)

    def check_row(self, row: dict) -> None:
        if float(row["repetition_penalty"]) != 1.0:
            raise ValueError("repetition_penalty is not supported with a draft model (speculative decoding)")

    def admit(self, slot: int, ids: list[int], row: dict, prompt_logprobs: bool = False) -> dict:
        n = len(ids)
        p = prompt_bucket(n, self.max_model_len)
        grid = np.full((1, p), self.pad_id, np.int32)
        grid[0, :n] = ids
        self.state, first = self._admit_program(p)(
            self.params,
            self.draft_params,
            self.state,
            grid,
            np.int32(n),
            np.int32(slot),
            row,
            np.bool_(prompt_logprobs),
        )
        self._lengths[slot] = n
        return jax.tree.map(sharding.to_host, first)

    @property
    def chunk_slots(self) -> int:
        """A chunk of rounds of up to k+1 tokens each (see Engine.decode)."""
        return self.chunk * (self.k + 1)

    def _run_decode(self, r: int, width: int, rows: np.ndarray, force_done: np.ndarray) -> tuple[dict, np.ndarray]:
        prog = self._decode_program(r, width)
        self.state, out, stats = prog(self.params, self.draft_params, self.state, rows, force_done)
        self.spec_stats = tuple(int(x) for x in sharding.to_host(stats))
        made = sharding.to_host(self.state.target.made)
        self._lengths = np.asarray(sharding.to_host(self.state.target.lengths), np.int64)
        full = {}
        for name, v in jax.tree.map(sharding.to_host, out).items():
            full[name] = np.zeros((self.slots, *v.shape[1:]), v.dtype)
            full[name][rows] = v
        return full, made
