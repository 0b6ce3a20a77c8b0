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

from neox_jax.inference import decode as core
from neox_jax.inference.sampling import SamplingParams
from neox_jax.inference.textstops import RowTracker
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import Params
from neox_jax.parallel import sharding
from neox_jax.store.tokenizer import Tokenizer

SLOT_ROUND = 64
# XLA CPU: with region analysis, copy insertion sees that each layer's cache update in the decode loop is the buffer's
# last use and updates it in place; without it XLA copied every cache buffer twice per step (measured in the HLO).
CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


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


def prompt_bucket(n: int, limit: int) -> int:
    b = 16
    while b < n:  # doubling to 128, then x1.5 / x4/3 in turn: 192, 256, 384, 512, 768, ...
        b = b * 2 if b < 128 else (b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3)
    return min(b, limit)


def batch_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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
        layout: core.Layout | None = None,
        mesh=None,
    ):
        """layout: None picks the fastest for the backend (decode.layout_for; on CPU a second, transposed copy of the
        matmul weights is made once and kept while these params are in use)."""
        self.cfg, self.params, self.tokenizer, self.chunk_size, self.mesh = cfg, params, tokenizer, chunk_size, mesh
        self.layout = layout
        self._compiled: dict[tuple, object] = {}  # (kind, shapes, statics) -> jax Compiled
        self._prepared = (None, None)  # (the params they were made from, the params in the run layout)
        self.compiles = 0  # programs compiled by this generator (tests check it stays put)

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

    def run_layout(self) -> core.Layout:
        return self.layout or core.layout_for(self.params, jax.default_backend())

    def run_params(self, layout: core.Layout) -> Params:
        """The params in the run layout (transposed once per params object when the layout asks; on CPU the
        prefill is faster on them too)."""
        if not layout.transposed:
            return self.params
        if self._prepared[0] is not self.params:
            self._prepared = (None, None)  # free the old copy first
            self._prepared = (self.params, core.transpose_kernels(self.params))
        return self._prepared[1]

    def release_params(self) -> None:
        """Drops the params and their run-layout copy (the compiled programs stay): set .params again to reuse."""
        self.params, self._prepared = None, (None, None)

    def _program(self, kind: str, key: tuple, params: Params, fn, *args):
        leaves, treedef = jax.tree.flatten(params)  # new params of another shape / dtype / sharding: recompile
        k = (kind, key, treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves), self.mesh)
        if k not in self._compiled:
            opts = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else {}
            self._compiled[k] = fn.lower(*args, mesh=self.mesh).compile(compiler_options=opts)
            self.compiles += 1
        return self._compiled[k]

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
        n, b_pre = len(ids), batch_bucket(len(ids))
        timing = Timing()
        layout = self.run_layout()
        t = time.perf_counter()
        params = self.run_params(layout)
        timing.prepare_s = time.perf_counter() - t
        b = max(b_pre, layout.min_rows)  # decode rows (extra ones are copies, forced done)
        if self.mesh is not None:  # the batch splits over `data`: a multiple of its size
            d = sharding.data_size(self.mesh)
            b_pre, b = -(-b_pre // d) * d, -(-b // d) * d
        p = prompt_bucket(longest, cfg.max_position_embeddings)
        s = -(-(p + max_new_tokens) // SLOT_ROUND) * SLOT_ROUND
        pad = tok.pad_id if tok else cfg.eos_token_id
        grid = np.full((b_pre, p), pad, np.int32)
        mask = np.zeros((b_pre, p), np.int32)
        for i in range(b_pre):
            row = ids[min(i, n - 1)]  # rows past n repeat the last prompt and are forced done
            grid[i, p - len(row) :], mask[i, p - len(row) :] = row, 1
        stop_mask = np.zeros(cfg.vocab_size, bool)
        stop_mask[stop_token_ids] = True
        force_done = np.arange(b) >= n
        values, key = sp.values(), jax.random.key(sp.seed)
        rows = [RowTracker(tok, stop_token_ids, stop, max_new_tokens) for _ in range(n)]

        if self.mesh is not None:  # global arrays: [B, ...] split over data, the rest replicated (works multi-host)
            grid, mask = sharding.put_batch(grid, self.mesh), sharding.put_batch(mask, self.mesh)
            values = jax.tree.map(lambda v: sharding.put_replicated(v, self.mesh), values)
            stop_mask = sharding.put_replicated(stop_mask, self.mesh)
            key = jax.random.wrap_key_data(sharding.put_replicated(jax.random.key_data(key), self.mesh))
        t = time.perf_counter()
        pre = self._program(
            "prefill",
            (b_pre, b, p, s, static, layout),
            params,
            core.prefill_jit,
            cfg,
            static,
            layout,
            s,
            b,
            params,
            grid,
            mask,
            values,
            stop_mask,
            key,
        )
        timing.compile_s += time.perf_counter() - t
        t = time.perf_counter()
        state = pre(params, grid, mask, values, stop_mask, key)
        first = sharding.to_host(state["tokens"])
        now = time.perf_counter()
        timing.prefill_s, timing.first_token_s = now - t, now - t_start
        event = self._advance(rows, first[:n, None])
        if streaming:
            yield event

        dec = None
        made, chunk = 1, (chunk_size or self.chunk_size) if (streaming or stop) else max_new_tokens
        while made < max_new_tokens and not all(r.finished for r in rows):
            if dec is None:
                t = time.perf_counter()
                dec = self._program(
                    "decode",
                    (b, s, static, layout),
                    params,
                    core.decode_jit,
                    cfg,
                    static,
                    layout,
                    params,
                    state,
                    values,
                    stop_mask,
                    self._put_done(force_done),
                    np.int32(1),
                )
                timing.compile_s += time.perf_counter() - t
            t = time.perf_counter()
            steps = min(chunk, max_new_tokens - made)
            force_done[:n] = [r.finished for r in rows]
            state, out, ran = dec(params, state, values, stop_mask, self._put_done(force_done), np.int32(steps))
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
        return GenerateResult(
            prompt_ids=ids,
            token_ids=[r.ids for r in rows],
            texts=[r.text for r in rows] if tok else None,
            finish_reasons=[r.finish_reason for r in rows],
            stopped_by=[r.stopped_by for r in rows],
            timing=timing,
        )

    @staticmethod
    def _advance(rows: list[RowTracker], new: np.ndarray) -> StreamEvent:
        pieces = [r.push(new[i].tolist()) for i, r in enumerate(rows)]
        return StreamEvent(
            token_ids=[p[0] for p in pieces],
            texts=[p[1] for p in pieces] if rows[0].tok else None,
            finish_reasons=[r.finish_reason for r in rows],
        )
