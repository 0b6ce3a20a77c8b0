"""Generation on the host side: prompts -> left-padded buckets -> compiled prefill + decode chunks -> tokens, text,
finish reasons, timing; streamed chunk by chunk.

    gen = Generator(cfg, params, tokenizer)
    result = gen.generate(["Hello"], max_new_tokens=32, temperature=0.8, top_p=0.95, stop=["\n\n"])
    for event in (stream := gen.stream(["Hello"], max_new_tokens=32)): print(event.texts[0], end="")
    stream.result  # the GenerateResult, once the iteration ended

Shapes are bucketed so nothing recompiles per call: the batch to the next power of two (extra rows are dropped), the
prompt length to 16, 32, 64, 128, 192, 256, 384, 512, 768, ... (x1.5 steps), the cache to the prompt bucket plus
max_new_tokens rounded up to 64. One prefill program per (batch, prompt bucket, cache length) and one decode program per
(batch, cache length) and sampling mode, each compiled once per Generator (AOT, timed) and reused; temperature, top_p,
the penalty, the seed and the stop ids are runtime values. The decode loop runs the whole generation in one call, or
in chunks of `chunk_size` steps when streaming or checking stop strings (a stop string can only be seen on the host).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from neox_jax.inference import core
from neox_jax.inference.core import SLOT_ROUND, batch_bucket, prompt_bucket
from neox_jax.inference.decode import Layout, layout_for, transpose_kernels
from neox_jax.inference.sampling import SamplingParams
from neox_jax.inference.textstops import RowTracker
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import Params, is_stacked
from neox_jax.parallel import sharding
from neox_jax.store.tokenizer import Tokenizer


@dataclasses.dataclass
class Timing:
    compile_s: float = 0.0  # tracing + XLA compile (0 when every program was already compiled)
    prepare_s: float = 0.0  # laying the weights out for the backend (once per params; see decode.layout_for)
    prefill_s: float = 0.0  # the prompt forward and the first token, compile excluded
    first_token_s: float = 0.0  # call start -> first tokens on the host (compile included when cold)
    decode_s: float = 0.0  # every decode chunk, host-side text handling included
    decode_tokens: int = 0  # tokens made by the decode loop (after the first), summed over the prompts

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclasses.dataclass
class GenerateResult:
    """token_ids: per prompt, every generated id up to and including the one that ended it (a stop id, or the token
    that completed a stop string). texts: the completions without the stop id / stop string (None without a
    tokenizer). finish_reasons: "stop" (stop id or string; stopped_by says which) or "length"."""

    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    stopped_by: list
    timing: Timing

    def to_dict(self) -> dict:
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "timing"},
            "timing": self.timing.to_dict(),
        }


@dataclasses.dataclass
class StreamEvent:
    """What one step of the stream added, per prompt: new ids, new text (held back while a character or a possible
    stop string is incomplete), and the finish reason once a row ends (None while it runs)."""

    token_ids: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str | None]


class Stream:
    """Iterate for StreamEvents; `.result` holds the GenerateResult once the iteration has ended."""

    def __init__(self, events):
        self._events, self.result = events, None

    def __iter__(self) -> Iterator[StreamEvent]:
        self.result = yield from self._events


class Generator:
    """mesh: the jax.sharding.Mesh the params are sharded over (None: one device). On a mesh the batch bucket is also
    a multiple of the mesh's `data` size (the extra rows are dropped), the KV cache is split over batch and heads,
    and on several processes every process passes the same prompts and gets every completion."""

    def __init__(
        self,
        cfg: NeoXConfig,
        params: Params,
        tokenizer: Tokenizer | None = None,
        *,
        chunk_size: int = 16,
        layout: Layout | None = None,
        mesh=None,
    ):
        """layout: None picks the fastest for the backend (decode.layout_for; on CPU a second, transposed copy of the
        matmul weights is made once and kept while these params are in use)."""
        self.cfg, self.params, self.tokenizer, self.chunk_size, self.mesh = cfg, params, tokenizer, chunk_size, mesh
        self.layout = layout
        self.programs = core.Programs()  # (kind, shapes, statics, params) -> compiled
        self._prepared = (None, None)  # (the params they were made from, the params in the run layout)

    # ---- inputs ------------------------------------------------------------------------------------------------------
    def encode(self, prompts) -> list[list[int]]:
        """str | list[str] | list[int] (one prompt of ids) | list[list[int]] -> a list of id lists, checked."""
        if isinstance(prompts, str) or (len(prompts) and all(isinstance(t, (int, np.integer)) for t in prompts)):
            prompts = [prompts]
        if not len(prompts):
            raise ValueError("no prompts given")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(
                        "text prompts need a tokenizer (the checkpoint has no tokenizer.json); "
                        "pass token-id lists instead"
                    )
                ids = self.tokenizer.encode(p)
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError(
                    f"prompt {i} is empty: give at least one token (e.g. the end-of-text id {self.cfg.eos_token_id})"
                )
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token ids {bad[:5]} outside [0, {self.cfg.vocab_size})")
            out.append(ids)
        return out

    def vocab_limit(self) -> int:
        return min(self.cfg.vocab_size, self.tokenizer.vocab_size) if self.tokenizer else self.cfg.vocab_size

    def run_layout(self) -> Layout:
        return self.layout or layout_for(self.params, jax.default_backend())

    def run_params(self, layout: Layout) -> Params:
        """The params in the run layout (transposed once per params object when the layout asks; on CPU the
        prefill is faster on them too)."""
        if not layout.transposed:
            return self.params
        if self._prepared[0] is not self.params:
            self._prepared = (None, None)  # free the old copy first
            self._prepared = (self.params, transpose_kernels(self.params))
        return self._prepared[1]

    @property
    def compiles(self) -> int:
        """Programs compiled by this generator (tests check it stays put)."""
        return self.programs.compiles

    def release_params(self) -> None:
        """Drops the params and their run-layout copy (the compiled programs stay): set .params again to reuse."""
        self.params, self._prepared = None, (None, None)

    def _put_done(self, force_done):
        return force_done if self.mesh is None else sharding.put_batch(force_done, self.mesh)

    # ---- the loop ----------------------------------------------------------------------------------------------------
    def stream(
        self,
        prompts,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int = 0,
        stop=None,
        stop_token_ids: Sequence[int] | None = None,
        chunk_size: int | None = None,
    ) -> Stream:
        """stop: a string or list of strings ending a completion (needs a tokenizer). stop_token_ids: ids ending a
        completion (default: the tokenizer's end-of-text, else the config's eos_token_id; [] for none).
        chunk_size: decode steps per event (default self.chunk_size; 1: one event per token)."""
        sp = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        return Stream(
            self._run(prompts, max_new_tokens, sp, stop, stop_token_ids, streaming=True, chunk_size=chunk_size)
        )

    def generate(
        self,
        prompts,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int = 0,
        stop=None,
        stop_token_ids: Sequence[int] | None = None,
        callback=None,
        suppress_token_ids: Sequence[int] = (),
    ) -> GenerateResult:
        """As `stream`, run to the end; callback(StreamEvent) is called for each step if given. suppress_token_ids:
        ids never emitted (what transformers' min_length does to the end-of-text id)."""
        events = self._run(
            prompts,
            max_new_tokens,
            SamplingParams(temperature, top_k, top_p, repetition_penalty, seed),
            stop,
            stop_token_ids,
            streaming=callback is not None,
            suppress_token_ids=suppress_token_ids,
        )
        while True:
            try:
                event = next(events)
            except StopIteration as e:
                return e.value
            callback(event)

    def _run(
        self,
        prompts,
        max_new_tokens,
        sp: SamplingParams,
        stop,
        stop_token_ids,
        streaming: bool,
        chunk_size: int | None = None,
        suppress_token_ids: Sequence[int] = (),
    ):
        t_start = time.perf_counter()
        cfg, tok = self.cfg, self.tokenizer
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {stop!r}")
        if stop and tok is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        if stop_token_ids is None:
            stop_token_ids = [tok.eos_id if tok else cfg.eos_token_id]
        stop_token_ids = [int(t) for t in stop_token_ids]
        if any(not 0 <= t < cfg.vocab_size for t in stop_token_ids):
            raise ValueError(f"stop_token_ids {stop_token_ids} must be in [0, {cfg.vocab_size})")
        suppress = [int(t) for t in suppress_token_ids]
        if any(not 0 <= t < cfg.vocab_size for t in suppress):
            raise ValueError(f"suppress_token_ids {suppress} must be in [0, {cfg.vocab_size})")
        ids = self.encode(prompts)
        longest = max(map(len, ids))
        if longest + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                f"max_position_embeddings {cfg.max_position_embeddings}; shorten the prompt or ask for "
                f"fewer tokens"
            )
        static = sp.static(self.vocab_limit(), suppress)
        n = len(ids)
        timing = Timing()
        layout = self.run_layout()
        t = time.perf_counter()
        params = self.run_params(layout)
        timing.prepare_s = time.perf_counter() - t
        b_pre = core.round_rows(batch_bucket(n), 1, self.mesh)  # prompt rows (past n: copies)
        b = core.round_rows(b_pre, layout.min_rows, self.mesh)  # decode rows (past n: forced done)
        p = prompt_bucket(longest, cfg.max_position_embeddings)
        s = -(-(p + max_new_tokens) // SLOT_ROUND) * SLOT_ROUND
        grid, mask = self._grid(ids, b_pre, p)
        settings = self._settings(sp, b, stop_token_ids, max_new_tokens)
        key = jax.random.key(sp.seed)
        if self.mesh is not None:  # global arrays: [B, ...] split over data, the rest replicated (works multi-host)
            grid, mask = sharding.put_batch(grid, self.mesh), sharding.put_batch(mask, self.mesh)
            settings = jax.tree.map(lambda v: sharding.put_batch(v, self.mesh), settings)
            key = jax.random.wrap_key_data(sharding.put_replicated(jax.random.key_data(key), self.mesh))
        force_done = np.arange(b) >= n
        rows = [RowTracker(tok, stop_token_ids, stop, max_new_tokens) for _ in range(n)]
        pk = core.params_key(params)

        t = time.perf_counter()
        statics = (cfg, static, layout, b, s, self.mesh)
        pre = self.programs.get(
            ("prefill", statics, p, b_pre, pk), _prefill_jit, *statics, params, grid, mask, settings, key
        )
        timing.compile_s += time.perf_counter() - t
        t = time.perf_counter()
        state = pre(params, grid, mask, settings, key)
        first = sharding.to_host(state.tokens)
        now = time.perf_counter()
        timing.prefill_s, timing.first_token_s = now - t, now - t_start
        event = self._advance(rows, first[:n, None])
        if streaming:
            yield event

        made, chunk = 1, (chunk_size or self.chunk_size) if (streaming or stop) else max_new_tokens
        while made < max_new_tokens and not all(r.finished for r in rows):
            t = time.perf_counter()
            statics = (cfg, static, layout, s, self.mesh)
            dec = self.programs.get(
                ("decode", statics, b, pk),
                _decode_jit,
                *statics,
                params,
                state,
                self._put_done(force_done),
                np.int32(1),
            )
            timing.compile_s += time.perf_counter() - t
            t = time.perf_counter()
            steps = min(chunk, max_new_tokens - made)
            force_done[:n] = [r.finished for r in rows]
            state, out, ran = dec(params, state, self._put_done(force_done), np.int32(steps))
            ran = int(sharding.to_host(ran))
            event = self._advance(rows, sharding.to_host(out)[:n, :ran])
            made += ran
            if ran == 0:  # every row is done on the device (cannot happen unless host and device disagree)
                break
            timing.decode_s += time.perf_counter() - t
            if streaming:
                yield event
        tail = [r.finish_length() for r in rows]  # rows still running here ran out of steps: "length"
        if streaming and any(tail):
            yield StreamEvent([[] for _ in rows], tail, [r.finish_reason for r in rows])
        timing.decode_tokens = sum(max(0, len(r.ids) - 1) for r in rows)
        return GenerateResult(**result_fields(ids, rows, tok, timing))

    def _grid(self, ids: list[list[int]], rows: int, p: int) -> tuple[np.ndarray, np.ndarray]:
        """The prompts left-padded to [rows, p] ids and mask (rows past the prompts repeat the last one)."""
        tok = self.tokenizer
        grid = np.full((rows, p), tok.pad_id if tok else self.cfg.eos_token_id, np.int32)
        mask = np.zeros((rows, p), np.int32)
        for i in range(rows):
            row = ids[min(i, len(ids) - 1)]
            grid[i, p - len(row) :], mask[i, p - len(row) :] = row, 1
        return grid, mask

    def _settings(self, sp: SamplingParams, rows: int, stop_ids: list[int], max_new: int) -> dict:
        """The decode state's per-row settings: the same for every row."""
        stop_mask = np.zeros((rows, self.cfg.vocab_size), bool)
        stop_mask[:, stop_ids] = True
        values = {k: np.full(rows, np.asarray(v), np.float32) for k, v in sp.values().items()}
        return {**values, "stop_mask": stop_mask, "max_new": np.full(rows, max_new, np.int32)}

    @staticmethod
    def _advance(rows: list[RowTracker], new: np.ndarray) -> StreamEvent:
        pieces = [r.push(new[i].tolist()) for i, r in enumerate(rows)]
        return StreamEvent(
            token_ids=[p[0] for p in pieces],
            texts=[p[1] for p in pieces] if rows[0].tok else None,
            finish_reasons=[r.finish_reason for r in rows],
        )


def _prefill(cfg, static, layout, rows, cache_len, mesh, params, grid, mask, settings, key) -> core.DecodeState:
    """A fresh state of `rows` rows x cache_len slots with the left-padded prompts grid, mask [R, P] in its first R."""
    state = core.empty_state(
        cfg, layout, rows, cache_len, settings, is_stacked(params), static.repetition_penalty, key, mesh
    )
    return core.prefill_into(cfg, static, layout, params, state, 0, grid, mask, mesh=mesh)[0]


def _decode(cfg, static, layout, width, mesh, params, state, force_done, n_steps):
    state, out, steps = core.decode_chunk(cfg, static, layout, params, state, force_done, n_steps, width, True, mesh)
    return state, out["tokens"], steps


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 1, 2, 3, 4, 5))
_decode_jit = jax.jit(_decode, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(6,))


def result_fields(ids, rows, tok, timing) -> dict:
    """The GenerateResult fields of finished rows (the speculative result has the same, plus its statistics)."""
    return {
        "prompt_ids": ids,
        "token_ids": [r.ids for r in rows],
        "texts": [r.text for r in rows] if tok else None,
        "finish_reasons": [r.finish_reason for r in rows],
        "stopped_by": [r.stopped_by for r in rows],
        "timing": timing,
    }
