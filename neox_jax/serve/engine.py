"""The compiled side of continuous batching: `slots` decode rows over one preallocated KV cache [slots, N, S, H] per
layer (S = max_model_len), with every per-request setting held as a per-row array, so a fixed, small set of programs
serves every mix of requests. Every program drives the decode core (neox_jax/inference/core.py):

    admit(P)   one per prompt bucket P (16, 32, 64, ... <= S; core.prompt_bucket): core.prefill_into one
               right-padded prompt [1, P] into one row (its slots 0..P-1; the others untouched), choosing its first
               token; on request (echo + logprobs) also the log-probabilities of the prompt tokens, behind a runtime
               switch (lax.cond) so it is the same program.
    admit_rows(R, P)  R prompts of one bucket at once (R = 4, 16, ... <= slots, R x P <= ADMIT_TOKENS) into R
               rows anywhere in the state: requests that arrive together are prefilled in one forward, which reads
               the weights once instead of R times.
    decode     core.decode_chunk: up to `chunk` single-token steps for every row at once, each row at its own slot
               (its position: prompts start at slot 0), so rows of any length mix; done and free rows are carried
               along unchanged.

A row's result depends on its own prompt and settings only: its prefill runs alone (batch 1), and in the decode
each row is computed alone (vmapped) at its own slot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.inference import core, sampling
from neox_jax.inference.core import prompt_bucket
from neox_jax.inference.decode import layout_for, transpose_kernels
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


def _init_state(cfg, layout, slots, length, stacked, mesh):
    settings = R.empty_rows(slots, cfg.vocab_size)
    return core.empty_state(cfg, layout, slots, length, settings, stacked, True, None, mesh)


def _admit(cfg, layout, vocab_limit, logprob_rows, mesh, params, state, ids, length, slot, row, prompt_logprobs):
    """ids [1, P] right-padded, length: its real tokens, slot: the row to fill, row: that row's settings,
    prompt_logprobs: bool, whether to score the prompt too."""
    p = ids.shape[1]
    static = sampling.per_row_static(vocab_limit, logprob_rows)
    mask = (jnp.arange(p) < length)[None].astype(jnp.int32)  # [1, P]
    row1 = jax.tree.map(lambda x: jnp.asarray(x)[None], row)
    state, hidden, first = core.prefill_into(cfg, static, layout, params, state, slot, ids, mask, row1, mesh)
    model = model_from_params(cfg, params, layout.transposed)

    def prompt_lps(hidden):  # the log-probability of each prompt token after the ones before it: [P - 1]
        logits = model.logits(hidden)[0, :-1]  # [P - 1, V]
        lp, top_ids, top_lp = sampling.logprobs(logits, ids[0, 1:], R.TOP_LOGPROBS, vocab_limit, logprob_rows)
        return lp, top_ids, top_lp

    def none(hidden):
        k = R.TOP_LOGPROBS
        return jnp.zeros(p - 1, F32), jnp.zeros((p - 1, k), jnp.int32), jnp.zeros((p - 1, k), F32)

    # the logits of every prompt position only for echo + logprobs (a runtime switch: one program per bucket)
    first["prompt_logprobs"], first["prompt_top_ids"], first["prompt_top_logprobs"] = jax.lax.cond(
        prompt_logprobs, prompt_lps, none, hidden
    )
    return state, first


def _row_index(path, rows, width: int, stacked: bool) -> tuple:
    """The index of rows [R] (None: every row) over the first `width` cache slots in one field of a DecodeState."""
    rows = slice(None) if rows is None else rows
    name = getattr(path[0], "name", None)
    if name == "cache":  # [B, N, S, H], stacked [L, B, N, S, H]
        return (
            (slice(None), rows, slice(None), slice(None, width)) if stacked else (rows, slice(None), slice(None, width))
        )
    return (rows, slice(None, width)) if name == "kv_valid" else (rows,)


def decode_rows(rows, slots: int):
    """A decode program's rows [R] as take_rows takes them: None (every row, nothing gathered) when R = slots, which
    Engine.decode runs in slot order (rows = arange(slots))."""
    return None if rows.shape[0] == slots else rows


def _whole(st: core.DecodeState, rows, width: int) -> bool:
    """Every row over every slot: the compact state is the state itself."""
    return rows is None and width == st.kv_valid.shape[1]


def take_rows(st: core.DecodeState, rows, width: int, stacked: bool) -> core.DecodeState:
    """Rows [R] of a decode state over its first `width` cache slots, as a compact state (key None). A row index past
    the last reads the last row (a padding row: computed, never written back). rows None: every row, in order, by
    slicing (a gather of the whole cache cost ~1.2 ms a pythia-70m step at 16 rows, chunk 8)."""
    st = st._replace(key=None)
    if _whole(st, rows, width):
        return st
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[_row_index(path, rows, width, stacked)].get(mode="clip"), st
    )


def put_rows(st: core.DecodeState, small: core.DecodeState, rows, width: int, stacked: bool) -> core.DecodeState:
    """`small` (from take_rows) written back into rows [R] of st (key None); a row index past the last is dropped."""
    if _whole(st, rows, width):
        return small._replace(key=None)
    return jax.tree_util.tree_map_with_path(
        lambda path, x, y: x.at[_row_index(path, rows, width, stacked)].set(y, mode="drop"),
        st._replace(key=None),
        small._replace(key=None),
    )


def _decode(cfg, layout, vocab_limit, logprob_rows, chunk, width, mesh, params, state, rows, force_done):
    """Up to `chunk` steps for the R rows `rows` [R] (distinct slots) over the first `width` cache slots: those rows
    are gathered into a compact state, decoded, and written back (the other rows untouched). out[k][r, i]: rows[r]'s
    step i (valid for the steps it was live); force_done [R]. R = B: every row, in slot order (see decode_rows)."""
    static = sampling.per_row_static(vocab_limit, logprob_rows)
    stacked = is_stacked(params)
    rows = decode_rows(rows, state.tokens.shape[0])
    small = take_rows(state, rows, width, stacked)
    small, out, steps = core.decode_chunk(cfg, static, layout, params, small, force_done, chunk, chunk, False, mesh)
    state = put_rows(state, small, rows, width, stacked)
    return core.constrain(state, mesh), out, steps


def _admit_rows(cfg, layout, vocab_limit, logprob_rows, mesh, params, state, ids, lengths, slots, rows):
    """ids [R, P] right-padded, lengths [R] their real tokens, slots [R] the rows to fill (distinct; B, one past the
    last row, marks a padding row: computed, never written), rows: their settings, each [R, ...]."""
    static = sampling.per_row_static(vocab_limit, logprob_rows)
    stacked = is_stacked(params)
    p = ids.shape[1]
    mask = (jnp.arange(p)[None] < lengths[:, None]).astype(jnp.int32)  # [R, P]
    small = take_rows(state, slots, p, stacked)  # prefill writes cache slots 0..P-1
    small, _, first = core.prefill_into(cfg, static, layout, params, small, 0, ids, mask, rows, mesh)
    state = put_rows(state, small, slots, p, stacked)
    state = state._replace(kv_valid=state.kv_valid.at[slots, p:].set(False, mode="drop"))  # a former request's slots
    return core.constrain(state, mesh), first


# A batched admission's most rows x prompt bucket: bounds its activations and how many programs warm-up compiles.
ADMIT_TOKENS = 2048


def admit_row_buckets(slots: int, min_rows: int, mesh) -> list[int]:
    """Batched admissions' row counts: 4, 16, 64, ... below slots, and slots (none for one slot)."""
    out, n = [], 4
    while n < slots:
        out.append(core.round_rows(n, min_rows, mesh))
        n *= 4
    return sorted({*out, slots}) if slots > 1 else []


def row_buckets(slots: int, min_rows: int, mesh) -> list[int]:
    """Decode programs' row counts: powers of two (rounded for the layout and mesh) up to slots, and slots."""
    out, n = [], 1
    while not out or out[-1] < slots:
        out.append(min(core.round_rows(n, min_rows, mesh), slots))
        n *= 2
    return sorted(set(out))


def length_buckets(max_model_len: int) -> list[int]:
    """Decode programs' attention widths: 64, 128, 256, ... below max_model_len, and max_model_len."""
    out, n = [], 64
    while n < max_model_len:
        out.append(n)
        n *= 2
    return [*out, max_model_len]


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
        self.layout = layout_for(params, jax.default_backend())
        self.params = transpose_kernels(params) if self.layout.transposed else params
        self.slots = core.round_rows(slots, self.layout.min_rows, mesh)
        self.max_model_len, self.vocab_limit = max_model_len, vocab_limit
        self.logprob_rows = cfg.vocab_size if logprob_rows is None else logprob_rows  # see sampling.log_probs
        if not 1 <= vocab_limit <= self.logprob_rows <= cfg.vocab_size:
            raise ValueError(
                f"logprob_rows {self.logprob_rows} must be in [vocab_limit {vocab_limit}, vocab_size {cfg.vocab_size}]"
            )
        self.buckets = buckets(max_model_len)
        self.row_buckets = row_buckets(self.slots, self.layout.min_rows, mesh)
        self.length_buckets = length_buckets(max_model_len)
        self.admit_rows = {  # prompt bucket -> its batched admissions' row counts
            p: [r for r in admit_row_buckets(self.slots, self.layout.min_rows, mesh) if r * p <= ADMIT_TOKENS]
            for p in self.buckets
        }
        self.programs = core.Programs()
        self.state = None
        self._lengths = np.zeros(self.slots, np.int64)  # each row's slots in use (host mirror: picks the width)
        self.last_bucket = None  # the (rows, width) of the last decode chunk

    @property
    def compiles(self) -> int:
        """Programs compiled (tests check nothing compiles after warm_up)."""
        return self.programs.compiles

    def _init_program(self):
        statics = (self.cfg, self.layout, self.slots, self.max_model_len, is_stacked(self.params), self.mesh)
        return self.programs.get(("init",), jax.jit(functools.partial(_init_state, *statics)))

    def _admit_program(self, p: int):
        fn = jax.jit(
            functools.partial(_admit, self.cfg, self.layout, self.vocab_limit, self.logprob_rows, self.mesh),
            donate_argnums=(1,),
        )
        row = jax.tree.map(lambda x: x[0], R.empty_rows(1, self.cfg.vocab_size))
        args = (self.params, self._state_for_lowering(), jax.ShapeDtypeStruct((1, p), jnp.int32))
        return self.programs.get(("admit", p), fn, *args, np.int32(0), np.int32(0), row, np.bool_(False))

    def _admit_rows_program(self, r: int, p: int):
        fn = jax.jit(
            functools.partial(_admit_rows, self.cfg, self.layout, self.vocab_limit, self.logprob_rows, self.mesh),
            donate_argnums=(1,),
        )
        rows = R.empty_rows(r, self.cfg.vocab_size)
        i32 = jax.ShapeDtypeStruct((r,), jnp.int32)
        args = (self.params, self._state_for_lowering(), jax.ShapeDtypeStruct((r, p), jnp.int32), i32, i32, rows)
        return self.programs.get(("admit_rows", r, p), fn, *args)

    def _decode_program(self, r: int, width: int):
        fn = jax.jit(
            functools.partial(
                _decode, self.cfg, self.layout, self.vocab_limit, self.logprob_rows, self.chunk, width, self.mesh
            ),
            donate_argnums=(1,),
        )
        rows = jnp.arange(r, dtype=jnp.int32)
        args = (self.params, self._state_for_lowering(), rows, np.zeros(r, bool))
        return self.programs.get(("decode", r, width), fn, *args)

    def _state_for_lowering(self):
        """The state itself once allocated (lowering reads its shardings, on a mesh), else its shapes."""
        if self.state is not None:
            return self.state
        statics = (self.cfg, self.layout, self.slots, self.max_model_len, is_stacked(self.params), None)
        return jax.eval_shape(lambda: _init_state(*statics))

    def warm_up(self) -> None:
        """Compiles every program a request inside the buckets can need, runs each once (see _run_once), and
        allocates the state."""
        self.state = self._init_program()()
        for p in self.buckets:
            self._admit_program(p)
            for r in self.admit_rows[p]:
                self._admit_rows_program(r, p)
        for r in self.row_buckets:
            for w in self.length_buckets:
                self._decode_program(r, w)
        self._run_once()

    def _run_once(self) -> None:
        """Runs every compiled program once on stand-in prompts, then frees every slot. XLA CPU's first run of a
        program cost ~100 ms more than the next ones (pythia-70m shapes), which the first requests after /health
        paid once per program they reached. The stand-in rows sample with top-p, a penalty (where the engine takes
        one) and log-probabilities, so the heavier side of each runtime switch runs too. Each decode runs one step:
        its rows are admitted again (overwritten) before it, with max_new 2."""
        row = {k: v[0] for k, v in R.empty_rows(1, self.cfg.vocab_size).items()}
        row.update(
            temperature=np.float32(0.8),
            top_p=np.float32(0.9),
            top_k=np.int32(5),
            repetition_penalty=np.float32(1.1),
            logprobs=np.bool_(True),
            max_new=np.int32(2),
        )
        try:
            self.check_row(row)
        except ValueError:
            row["repetition_penalty"] = np.float32(1.0)
        for p in self.buckets:
            self.admit(0, [self.pad_id] * p, row, prompt_logprobs=True)
            for r in self.admit_rows[p]:
                self.admit_many(list(range(r)), [[self.pad_id] * p] * r, [row] * r)
        if self.max_model_len > 1:  # (a one-slot model has no decode step)
            for r in self.row_buckets:
                for w in self.length_buckets:
                    for slot in range(r):
                        self.admit(slot, [self.pad_id], row)
                    self._run_decode(r, w, np.arange(r, dtype=np.int32), np.zeros(r, bool))
        self.reset()

    def reset(self) -> None:
        """Every slot free (a fresh state)."""
        self.state = self._init_program()()
        self._lengths[:] = 0

    def check_row(self, row: dict) -> None:
        """Raises ValueError for per-row settings this engine cannot honour (none here; see SpecEngine)."""

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
        self._lengths[slot] = n
        return jax.tree.map(sharding.to_host, first)

    def batch_limit(self, n: int) -> int:
        """The most prompts of n tokens one batched admission takes (1: none; they go one at a time)."""
        return max(self.admit_rows[prompt_bucket(n, self.max_model_len)], default=1)

    def admit_many(self, slots: list[int], prompts: list[list[int]], rows: list[dict]) -> list[dict]:
        """Prefills several prompts of one bucket (at most batch_limit) into their free slots in one program, with
        their settings; returns each one's first outputs as admit does."""
        p = prompt_bucket(max(map(len, prompts)), self.max_model_len)
        if any(prompt_bucket(len(x), self.max_model_len) != p for x in prompts):
            raise ValueError(f"admit_many: prompts of {sorted(map(len, prompts))} tokens are not in one bucket")
        r = next(b for b in self.admit_rows[p] if b >= len(prompts))
        grid = np.full((r, p), self.pad_id, np.int32)
        lengths = np.ones(r, np.int32)
        where = np.full(r, self.slots, np.int32)  # padding rows: one past the last slot, never written
        settings = R.empty_rows(r, self.cfg.vocab_size)
        for i, (slot, ids, row) in enumerate(zip(slots, prompts, rows)):
            grid[i, : len(ids)], lengths[i], where[i] = ids, len(ids), slot
            for k, v in row.items():
                settings[k][i] = v
        self.state, first = self._admit_rows_program(r, p)(self.params, self.state, grid, lengths, where, settings)
        first = jax.tree.map(sharding.to_host, first)
        for slot, ids in zip(slots, prompts):
            self._lengths[slot] = len(ids)
        return [{k: v[i : i + 1] for k, v in first.items()} for i in range(len(prompts))]

    def decode(self, force_done: np.ndarray) -> tuple[dict, np.ndarray]:
        """One chunk for the rows not forced done: the smallest row bucket that holds them, over the smallest width
        that holds their slots after the chunk. Returns the outputs of every slot (numpy; zeros for the rows not
        run) and how many tokens each row has made in all."""
        live = np.flatnonzero(~force_done)
        r = next(b for b in self.row_buckets if b >= len(live))
        if r == self.slots:  # the every-row program: slot order (see decode_rows)
            rows = np.arange(r, dtype=np.int32)
        else:
            rows = np.concatenate([live, np.flatnonzero(force_done)[: r - len(live)]]).astype(np.int32)
        need = int(self._lengths[live].max(initial=0)) + self.chunk_slots
        width = next((w for w in self.length_buckets if w >= need), self.length_buckets[-1])
        self.last_bucket = (r, width)  # (tests read it)
        return self._run_decode(r, width, rows, force_done[rows])

    @property
    def chunk_slots(self) -> int:
        """The most cache slots a row takes in one decode chunk."""
        return self.chunk

    def _run_decode(self, r: int, width: int, rows: np.ndarray, force_done: np.ndarray) -> tuple[dict, np.ndarray]:
        """The (r, width) decode program over rows [r] (force_done [r]); returns decode's outputs."""
        self.state, out, _ = self._decode_program(r, width)(self.params, self.state, rows, force_done)
        made = sharding.to_host(self.state.made)
        self._lengths = np.asarray(sharding.to_host(self.state.lengths), np.int64)
        full = {}
        for k, v in jax.tree.map(sharding.to_host, out).items():
            full[k] = np.zeros((self.slots, *v.shape[1:]), v.dtype)
            full[k][rows] = v
        return full, made
