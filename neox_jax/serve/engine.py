"""The compiled side of continuous batching: `slots` decode rows over one preallocated KV cache [slots, N, S, H] per
layer (S = max_model_len), with every per-request setting held as a per-row array, so a fixed, small set of programs
serves every mix of requests:

    admit(P)   one per prompt bucket P (16, 32, 64, ... <= S; generate.prompt_bucket): runs one right-padded prompt
               [1, P] through the model, chooses its first token, and writes its keys / values into slots 0..P-1 of
               one cache row (the others untouched); on request (echo + logprobs) also the log-probabilities of the
               prompt tokens, behind a runtime switch (lax.cond) so it is the same program.
    decode     up to `chunk` single-token steps for every row at once (lax.while_loop, state donated: the cache is
               updated in place), stopping early once every row is done. Each row writes its token at its own slot
               (its position: prompts start at slot 0), so rows of any length mix; done and free rows are carried
               along unchanged.

A row's result depends on its own prompt and settings only: its prefill runs alone (batch 1), and in the decode
matmuls of one fixed shape each row is computed independently of the others' values.

State (device): {"cache", "kv_valid" [B, S] bool, "tokens" [B] (the last chosen token, not yet in the cache),
"positions" [B] (its position = its slot), "made" [B] (tokens made), "done" [B], "seen" [B, V] (for the repetition
penalty), "rows": per-row settings (see rows.empty_rows)}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.inference import decode as core
from neox_jax.inference.cache import init_cache
from neox_jax.inference.generate import CPU_COMPILER_OPTIONS, prompt_bucket
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import Params, is_stacked, model_from_params
from neox_jax.parallel import sharding
from neox_jax.serve import rows as R

F32 = jnp.float32


def buckets(max_model_len: int) -> list[int]:
    """Every prompt bucket up to max_model_len (the last one is max_model_len itself)."""
    out, n = [], 1
    while not out or out[-1] < max_model_len:
        out.append(prompt_bucket(n, max_model_len))
        n = out[-1] + 1
    return out


def _init_state(cfg, layout, slots, length, vocab, stacked, mesh):
    state = {
        "cache": init_cache(cfg, slots, length, layout.cache_dtype, stacked),
        "kv_valid": jnp.zeros((slots, length), bool),
        "tokens": jnp.zeros(slots, jnp.int32),
        "positions": jnp.zeros(slots, jnp.int32),
        "made": jnp.zeros(slots, jnp.int32),
        "done": jnp.ones(slots, bool),
        "seen": jnp.zeros((slots, vocab), bool),
        "rows": jax.tree.map(jnp.asarray, R.empty_rows(slots, vocab)),
    }
    return sharding.constrain_state(state, mesh)


def _admit(cfg, layout, vocab_limit, logprob_rows, mesh, params, state, ids, length, slot, row, prompt_logprobs):
    """ids [1, P] right-padded, length: its real tokens, slot: the row to fill, row: that row's settings,
    prompt_logprobs: bool, whether to score the prompt too."""
    p, s = ids.shape[1], state["kv_valid"].shape[1]
    model = model_from_params(cfg, params, layout.transposed)
    valid = jnp.arange(p) < length  # [P]
    stacked = is_stacked(params)
    cache = init_cache(cfg, 1, p, layout.cache_dtype, stacked)
    hidden, cache = model.hidden_states(ids, jnp.arange(p)[None], valid[None], cache, 0)  # [1, P, D]
    m = layout.min_rows  # bf16 on CPU: two rows per matmul (see decode.layout_for)
    start = jnp.clip(length - m, 0, p - m)
    last = jax.lax.dynamic_slice_in_dim(hidden, start, m, axis=1)  # [1, m, D]
    logits = jax.lax.dynamic_index_in_dim(model.logits(last)[0], length - 1 - start, keepdims=True)  # [1, V]
    seen = jnp.zeros(cfg.vocab_size, bool).at[ids[0]].max(valid)  # the prompt's ids
    row1 = jax.tree.map(lambda x: x[None], row)
    tok, lp, top_ids, top_lp = R.choose_rows(
        logits, row1, jnp.zeros(1, jnp.int32), seen[None], vocab_limit, logprob_rows
    )
    first = {"tokens": tok, "logprobs": lp, "top_ids": top_ids, "top_logprobs": top_lp}

    def prompt_lps(hidden):  # the log-probability of each prompt token after the ones before it: [P - 1]
        allp = R.log_probs(model.logits(hidden)[0, :-1], vocab_limit, logprob_rows)  # [P-1, V]
        top_lp, top_ids = jax.lax.top_k(allp, R.TOP_LOGPROBS)
        return jnp.take_along_axis(allp, ids[0, 1:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp

    def none(hidden):
        k = R.TOP_LOGPROBS
        return jnp.zeros(p - 1, F32), jnp.zeros((p - 1, k), jnp.int32), jnp.zeros((p - 1, k), F32)

    # the logits of every prompt position only for echo + logprobs (a runtime switch: one program per bucket)
    first["prompt_logprobs"], first["prompt_top_ids"], first["prompt_top_logprobs"] = jax.lax.cond(
        prompt_logprobs, prompt_lps, none, hidden
    )
    at = (0, slot, 0, 0, 0) if stacked else (slot, 0, 0, 0)
    big = jax.tree.map(lambda b, c: jax.lax.dynamic_update_slice(b, c.astype(b.dtype), at), state["cache"], cache)
    t = tok[0]
    new = {
        "cache": big,
        "kv_valid": state["kv_valid"].at[slot].set(jnp.pad(valid, (0, s - p))),
        "tokens": state["tokens"].at[slot].set(t),
        "positions": state["positions"].at[slot].set(length),
        "made": state["made"].at[slot].set(1),
        "done": state["done"].at[slot].set(row["stop_mask"][t] | (row["max_new"] <= 1)),
        "seen": state["seen"].at[slot].set(seen.at[t].set(True)),
        "rows": jax.tree.map(lambda a, x: a.at[slot].set(x), state["rows"], row),
    }
    return sharding.constrain_state(new, mesh), first


def _decode(cfg, layout, vocab_limit, logprob_rows, chunk, mesh, params, state, force_done):
    """Up to `chunk` steps; out[b, i]: the token row b chose at step i (valid for the steps it was live)."""
    model = model_from_params(cfg, params, layout.transposed)
    b = state["tokens"].shape[0]
    axis = 1 if is_stacked(params) else 0  # the batch axis of the cache buffers
    rows_ix = jnp.arange(b)

    def one_row(tok, pos, valid, cache):  # a row alone (vmapped): its token goes to its own slot `pos`
        cache = jax.tree.map(lambda x: jnp.expand_dims(x, axis), cache)
        hidden, cache = model.hidden_states(tok[None, None], pos[None, None], valid[None], cache, pos)
        return hidden[0, 0], jax.tree.map(lambda x: jnp.squeeze(x, axis), cache)

    def cond(carry):
        return (carry[0] < chunk) & ~jnp.all(carry[1]["done"])

    def body(carry):
        i, st, out = carry
        live = ~st["done"]
        pos = st["positions"]
        kv_valid = st["kv_valid"].at[rows_ix, pos].set(st["kv_valid"][rows_ix, pos] | live)
        hidden, cache = jax.vmap(one_row, in_axes=(0, 0, 0, axis), out_axes=(0, axis))(
            st["tokens"], pos, kv_valid, st["cache"]
        )  # [B, D]
        logits = model.logits(hidden[:, None])[:, 0]  # [B, V] float32
        tok, lp, top_ids, top_lp = R.choose_rows(logits, st["rows"], st["made"], st["seen"], vocab_limit, logprob_rows)
        tok = jnp.where(live, tok, st["tokens"])
        made = st["made"] + live
        stop = st["rows"]["stop_mask"][rows_ix, tok] | (made >= st["rows"]["max_new"])
        new = {
            "cache": cache,
            "kv_valid": kv_valid,
            "tokens": tok,
            "positions": pos + live,
            "made": made,
            "done": st["done"] | (live & stop),
            "rows": st["rows"],
            "seen": st["seen"].at[rows_ix, tok].set(st["seen"][rows_ix, tok] | live),
        }
        out = {
            k: jax.lax.dynamic_update_index_in_dim(out[k], v, i, axis=1)
            for k, v in (("tokens", tok), ("logprobs", lp), ("top_ids", top_ids), ("top_logprobs", top_lp))
        }
        return i + 1, sharding.constrain_state(new, mesh), out

    out = {
        "tokens": jnp.zeros((b, chunk), jnp.int32),
        "logprobs": jnp.zeros((b, chunk), jnp.float32),
        "top_ids": jnp.zeros((b, chunk, R.TOP_LOGPROBS), jnp.int32),
        "top_logprobs": jnp.zeros((b, chunk, R.TOP_LOGPROBS), jnp.float32),
    }
    state = {**state, "done": state["done"] | force_done}
    steps, state, out = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), state, out))
    return sharding.constrain_state(state, mesh), out, steps


class Engine:
    """Owns the device state and the compiled programs; called from one thread only (the scheduler's)."""

    def __init__(
        self,
        cfg: NeoXConfig,
        params: Params,
        *,
        slots: int,
        max_model_len: int,
        vocab_limit: int,
        logprob_rows: int | None = None,
        chunk: int = 8,
        pad_id: int = 0,
        mesh=None,
    ):
        if not 1 <= max_model_len <= cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_model_len} must be in [1, max_position_embeddings {cfg.max_position_embeddings}]"
            )
        self.cfg, self.mesh, self.chunk, self.pad_id = cfg, mesh, chunk, pad_id
        self.layout = core.layout_for(params, jax.default_backend())
        self.params = core.transpose_kernels(params) if self.layout.transposed else params
        self.slots = max(slots, self.layout.min_rows)
        if mesh is not None:  # the slots split over `data`: a multiple of its size
            self.slots = -(-self.slots // sharding.data_size(mesh)) * sharding.data_size(mesh)
        self.max_model_len, self.vocab_limit = max_model_len, vocab_limit
        self.logprob_rows = cfg.vocab_size if logprob_rows is None else logprob_rows  # see rows.log_probs
        if not 1 <= vocab_limit <= self.logprob_rows <= cfg.vocab_size:
            raise ValueError(
                f"logprob_rows {self.logprob_rows} must be in [vocab_limit {vocab_limit}, vocab_size {cfg.vocab_size}]"
            )
        self.buckets = buckets(max_model_len)
        self.compiles = 0  # programs compiled (tests check nothing compiles after warm_up)
        self._programs: dict[tuple, object] = {}
        self.state = None

    def _compiled(self, key, fn, *args):
        if key not in self._programs:
            opts = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else {}
            self._programs[key] = fn.lower(*args).compile(compiler_options=opts)
            self.compiles += 1
        return self._programs[key]

    def _init_program(self):
        fn = jax.jit(
            functools.partial(
                _init_state,
                self.cfg,
                self.layout,
                self.slots,
                self.max_model_len,
                self.cfg.vocab_size,
                is_stacked(self.params),
                self.mesh,
            )
        )
        return self._compiled(("init",), fn)

    def _admit_program(self, p: int):
        fn = jax.jit(
            functools.partial(_admit, self.cfg, self.layout, self.vocab_limit, self.logprob_rows, self.mesh),
            donate_argnums=(1,),
        )
        row = jax.tree.map(lambda x: x[0], R.empty_rows(1, self.cfg.vocab_size))
        args = (
            self.params,
            self._state_for_lowering(),
            jax.ShapeDtypeStruct((1, p), jnp.int32),
            np.int32(0),
            np.int32(0),
            row,
            np.bool_(False),
        )
        return self._compiled(("admit", p), fn, *args)

    def _decode_program(self):
        fn = jax.jit(
            functools.partial(
                _decode, self.cfg, self.layout, self.vocab_limit, self.logprob_rows, self.chunk, self.mesh
            ),
            donate_argnums=(1,),
        )
        return self._compiled(("decode",), fn, self.params, self._state_for_lowering(), np.zeros(self.slots, bool))

    def _state_for_lowering(self):
        """The state itself once allocated (lowering reads its shardings, on a mesh), else its shapes."""
        if self.state is not None:
            return self.state
        return jax.eval_shape(
            lambda: _init_state(
                self.cfg,
                self.layout,
                self.slots,
                self.max_model_len,
                self.cfg.vocab_size,
                is_stacked(self.params),
                None,
            )
        )

    def warm_up(self) -> None:
        """Compiles every program a request inside the buckets can need, and allocates the state."""
        self.state = self._init_program()()
        for p in self.buckets:
            self._admit_program(p)
        self._decode_program()

    def reset(self) -> None:
        self.state = self._init_program()()

    def admit(self, slot: int, ids: list[int], row: dict, prompt_logprobs: bool = False) -> dict:
        """Prefills `ids` into `slot` (free) with its settings `row` (numpy, see rows.empty_rows, one row);
        returns the first token's outputs as numpy ({"tokens": [1], ...})."""
        n = len(ids)
        p = prompt_bucket(n, self.max_model_len)
        grid = np.full((1, p), self.pad_id, np.int32)
        grid[0, :n] = ids
        prog = self._admit_program(p)
        self.state, first = prog(
            self.params, self.state, grid, np.int32(n), np.int32(slot), row, np.bool_(prompt_logprobs)
        )
        return jax.tree.map(sharding.to_host, first)

    def decode(self, force_done: np.ndarray) -> tuple[dict, np.ndarray]:
        """One chunk; returns the outputs (numpy) and how many tokens each row has made in all."""
        self.state, out, _ = self._decode_program()(self.params, self.state, force_done)
        return jax.tree.map(sharding.to_host, out), sharding.to_host(self.state["made"])
