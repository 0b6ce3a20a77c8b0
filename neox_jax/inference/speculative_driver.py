"""Speculative decoding on the host side: a target Generator and a draft Generator -> the same calls, results and
stream events as Generator, plus acceptance statistics.

    spec = SpeculativeGenerator(target.generator(), draft.generator(), draft_tokens=4)
    result = spec.generate(["Hello"], max_new_tokens=64)       # greedy: token for token the target's own output
    result.speculative  # {"acceptance_rate": ..., "tokens_per_target_step": ..., ...}

The programs (neox_jax/inference/speculative.py) are compiled once per (batch, prompt bucket, cache length, k,
sampling mode) and kept in the target Generator's program cache (core.Programs). The cache gets k extra slots (a
round may write k tokens past the last one kept). Not supported with a draft: the repetition penalty (its
distribution changes along the drafted tokens).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from neox_jax.errors import NeoXError
from neox_jax.inference import core
from neox_jax.inference import speculative as spec
from neox_jax.inference.generate import (
    SLOT_ROUND,
    GenerateResult,
    Generator,
    Stream,
    StreamEvent,
    Timing,
    batch_bucket,
    prompt_bucket,
    result_fields,
)
from neox_jax.inference.sampling import SamplingParams
from neox_jax.inference.textstops import RowTracker
from neox_jax.parallel import sharding

MAX_DRAFT_TOKENS = 16


@dataclasses.dataclass
class SpeculativeResult(GenerateResult):
    """A GenerateResult with `speculative`: draft_tokens (k), proposed / accepted drafts (summed over rows and
    rounds), acceptance_rate (accepted / proposed), target_steps (target forwards, summed over rows) and
    tokens_per_target_step (tokens made after the first / target_steps: 1 + the accepted drafts per step, less what
    a stop or max_new_tokens cut off)."""

    speculative: dict = dataclasses.field(default_factory=dict)


def _same_tokenizer(a, b) -> bool:
    return a._tok.get_vocab(with_added_tokens=True) == b._tok.get_vocab(with_added_tokens=True)


def check_tokenizers(tt, dt) -> None:
    """Refuses a draft tokenizer dt that is not the target's tt (NeoXError naming both)."""
    if tt is not dt and not _same_tokenizer(tt, dt):
        raise NeoXError(
            f"the draft's tokenizer ({dt.source}, {dt.vocab_size} ids) is not the target's ({tt.source}, "
            f"{tt.vocab_size} ids): a draft must share the target's tokenizer (every Pythia and GPT-NeoX-20B do)"
        )


def check_draft(target: Generator, draft: Generator, draft_tokens: int) -> None:
    """Refuses a draft that cannot propose for this target: another tokenizer, too few embedding rows, k out of
    range (NeoXError naming both)."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, (int, np.integer)):
        raise NeoXError(f"draft_tokens must be an int in [1, {MAX_DRAFT_TOKENS}], got {draft_tokens!r}")
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise NeoXError(f"draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], got {draft_tokens}")
    tt, dt = target.tokenizer, draft.tokenizer
    if tt is not None and dt is not None:
        check_tokenizers(tt, dt)
    u = target.vocab_limit()
    if draft.cfg.vocab_size < u:
        raise NeoXError(
            f"the draft's embedding has {draft.cfg.vocab_size} rows, fewer than the {u} ids the target may emit "
            f"({'its tokenizer' if tt else 'its vocab_size'}): the draft could not read them"
        )


class SpeculativeGenerator:
    """generate / stream as Generator's (same arguments), with the draft proposing draft_tokens tokens a round."""

    def __init__(self, target: Generator, draft: Generator, draft_tokens: int = 4):
        check_draft(target, draft, draft_tokens)
        self.target, self.draft, self.k = target, draft, int(draft_tokens)

    def stream(
        self,
        prompts,
        max_new_tokens=32,
        temperature=0.0,
        top_k=None,
        top_p=None,
        repetition_penalty=None,
        seed=0,
        stop=None,
        stop_token_ids=None,
        chunk_size=None,
    ) -> Stream:
        """chunk_size: rounds per event (each round makes 1 to draft_tokens + 1 tokens a row); default 1."""
        sp = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        return Stream(self._run(prompts, max_new_tokens, sp, stop, stop_token_ids, True, chunk_size or 1))

    def generate(
        self,
        prompts,
        max_new_tokens=32,
        temperature=0.0,
        top_k=None,
        top_p=None,
        repetition_penalty=None,
        seed=0,
        stop=None,
        stop_token_ids=None,
        callback=None,
    ) -> SpeculativeResult:
        sp = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        events = self._run(prompts, max_new_tokens, sp, stop, stop_token_ids, callback is not None, 1)
        while True:
            try:
                event = next(events)
            except StopIteration as e:
                return e.value
            callback(event)

    def _run(self, prompts, max_new_tokens, sp: SamplingParams, stop, stop_token_ids, streaming: bool, chunk: int):
        t_start = time.perf_counter()
        tgt, dft, k = self.target, self.draft, self.k
        cfg, tok, mesh = tgt.cfg, tgt.tokenizer, tgt.mesh
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if sp.repetition_penalty not in (None, 1.0):
            raise NeoXError("repetition_penalty is not supported with a draft model (generate without draft=)")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {stop!r}")
        if stop and tok is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        stop_token_ids = [
            int(t) for t in ([tok.eos_id if tok else cfg.eos_token_id] if stop_token_ids is None else stop_token_ids)
        ]
        if any(not 0 <= t < cfg.vocab_size for t in stop_token_ids):
            raise ValueError(f"stop_token_ids {stop_token_ids} must be in [0, {cfg.vocab_size})")
        ids = tgt.encode(prompts)
        bad = [t for row in ids for t in row if t >= dft.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the draft's vocabulary [0, {dft.cfg.vocab_size})")
        longest = max(map(len, ids))
        limit_pos = min(cfg.max_position_embeddings, dft.cfg.max_position_embeddings)
        if longest + max_new_tokens + k > limit_pos:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} + draft_tokens {k} exceeds "
                f"max_position_embeddings {limit_pos} (of the target or draft); shorten the prompt or ask for fewer"
            )
        static = sp.static(tgt.vocab_limit())
        n = len(ids)
        timing = Timing()
        layout, dlayout = tgt.run_layout(), dft.run_layout()
        t = time.perf_counter()
        params, dparams = tgt.run_params(layout), dft.run_params(dlayout)
        timing.prepare_s = time.perf_counter() - t
        # every row prefilled (past n: copies, forced done) so all start at the same slot
        b = core.round_rows(batch_bucket(n), max(layout.min_rows, dlayout.min_rows), mesh)
        p = prompt_bucket(longest, cfg.max_position_embeddings)
        s = -(-(p + max_new_tokens + k) // SLOT_ROUND) * SLOT_ROUND  # a round writes up to k slots past the last kept
        grid, mask = tgt._grid(ids, b, p)
        settings = tgt._settings(sp, b, stop_token_ids, max_new_tokens)
        force_done = np.arange(b) >= n
        values, key = sp.values(), jax.random.key(sp.seed)
        rows = [RowTracker(tok, stop_token_ids, stop, max_new_tokens) for _ in range(n)]
        if mesh is not None:
            grid, mask = sharding.put_batch(grid, mesh), sharding.put_batch(mask, mesh)
            settings = jax.tree.map(lambda v: sharding.put_batch(v, mesh), settings)
            values = jax.tree.map(lambda v: sharding.put_replicated(v, mesh), values)
            key = jax.random.wrap_key_data(sharding.put_replicated(jax.random.key_data(key), mesh))
        pk = (core.params_key(params), core.params_key(dparams))
        statics = (cfg, dft.cfg, static, layout, dlayout)
        t = time.perf_counter()
        pre = tgt.programs.get(
            ("spec_prefill", statics, b, p, s, mesh, pk),
            spec.prefill_jit,
            *statics,
            s,
            params,
            dparams,
            grid,
            mask,
            settings,
            key,
            mesh=mesh,
        )
        timing.compile_s += time.perf_counter() - t
        t = time.perf_counter()
        state = pre(params, dparams, grid, mask, settings, key)
        first = sharding.to_host(state.target.tokens)
        now = time.perf_counter()
        timing.prefill_s, timing.first_token_s = now - t, now - t_start
        event = Generator._advance(rows, first[:n, None])
        if streaming:
            yield event
        run, per_call = None, chunk if (streaming or stop) else max_new_tokens
        while not all(r.finished for r in rows):
            force_done[:n] = [r.finished for r in rows]
            done = tgt._put_done(force_done)
            if run is None:
                t = time.perf_counter()
                run = tgt.programs.get(
                    ("spec_rounds", statics, k, b, s, mesh, pk),
                    spec.rounds_jit,
                    *statics,
                    k,
                    params,
                    dparams,
                    state,
                    values,
                    done,
                    np.int32(1),
                    mesh=mesh,
                )
                timing.compile_s += time.perf_counter() - t
            t = time.perf_counter()
            state, out, count, ran = run(params, dparams, state, values, done, np.int32(per_call))
            out, count = sharding.to_host(out["tokens"]), sharding.to_host(count)
            event = Generator._advance(rows, [out[i, : count[i]] for i in range(n)])
            timing.decode_s += time.perf_counter() - t
            if int(sharding.to_host(ran)) == 0:  # every row done on the device (stop id / limit): the host agrees
                break
            if streaming:
                yield event
        tail = [r.finish_length() for r in rows]
        if streaming and any(tail):
            yield StreamEvent([[] for _ in rows], tail, [r.finish_reason for r in rows])
        timing.decode_tokens = sum(max(0, len(r.ids) - 1) for r in rows)
        stats = {name: sharding.to_host(getattr(state, name))[:n] for name in ("proposed", "accepted", "steps")}
        proposed, accepted, steps = (int(stats[x].sum()) for x in ("proposed", "accepted", "steps"))
        return SpeculativeResult(
            **result_fields(ids, rows, tok, timing),
            speculative={
                "draft_tokens": k,
                "proposed": proposed,
                "accepted": accepted,
                "acceptance_rate": accepted / proposed if proposed else 0.0,
                "target_steps": steps,
                "tokens_per_target_step": timing.decode_tokens / steps if steps else 0.0,
            },
        )


def for_models(target, draft, draft_tokens: int) -> SpeculativeGenerator:
    """The SpeculativeGenerator of two loaded NeoX models (kept on the target between calls with the same draft)."""
    cached = getattr(target, "_speculative", None)
    if cached is None or cached.draft is not draft.generator() or cached.k != draft_tokens:
        cached = SpeculativeGenerator(target.generator(), draft.generator(), draft_tokens)
        target._speculative = cached
    cached.target = target.generator()
    return cached
