"""Choosing the next token from float32 logits [B, V]: greedy, temperature, top-k, top-p, repetition penalty.

The settings are split in two. The *static* part (`SamplingParams.static()`: greedy or not, the top-k size, whether
top-p / the repetition penalty are on, the vocabulary limit) shapes the compiled program; the *values*
(`SamplingParams.values()`: temperature, top_p, penalty as float32 scalars) are traced arguments, so changing a
temperature never recompiles. Order, as in Hugging Face's `generate`: repetition penalty, then temperature, top-k,
top-p. Ids at or above the tokenizer's vocabulary size (the embedding's padded rows) are never chosen.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from neox_jax.errors import NeoXError

F32 = jnp.float32
# Below this the float32 division logits / temperature overflows for ordinary logits (|x| ~ 10 over 1e-38 is inf,
# and inf - inf is NaN in the softmax: garbage ids), while at 1e-4 a logit gap of 0.01 is already a factor e^100
# (sampling equals greedy to float32 precision): there is nothing between the two worth sampling. 0 means greedy.
MIN_TEMPERATURE = 1e-4
SEED_LIMIT = 2**63  # jax.random.key takes a 64-bit seed; 2**63 and up overflow int64


class Static(NamedTuple):
    """The compile-time part of the sampling settings (hashable: a jit static argument)."""

    greedy: bool
    top_k: int  # 0: off
    top_p: bool
    repetition_penalty: bool
    vocab_limit: int  # ids >= this are never emitted
    suppress: tuple[int, ...] = ()  # ids never emitted (HF's min_length keeps the end-of-text id out this way)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (top_k / top_p then ignored)
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None  # HF / CTRL style: > 1 discourages tokens already in prompt or output
    seed: int = 0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise NeoXError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise NeoXError(
                f"temperature {t!r} is too small to sample with in float32: use 0 (greedy, the same "
                f"choice) or a value >= {MIN_TEMPERATURE:g}"
            )
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise NeoXError(f"top_k must be an int >= 1 (or None for off), got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise NeoXError(f"top_p must be in (0, 1] (or None for off), got {p!r}")
        r = self.repetition_penalty
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0):
            raise NeoXError(f"repetition_penalty must be a finite number > 0 (1 or None = off), got {r!r}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s < SEED_LIMIT:
            raise NeoXError(f"seed must be an int in [0, 2**63), got {s!r}")
        object.__setattr__(self, "seed", int(s))  # a numpy integer works like an int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def static(self, vocab_limit: int, suppress=()) -> Static:
        if self.top_k is not None and self.top_k > vocab_limit:
            raise ValueError(f"top_k {self.top_k} exceeds the {vocab_limit} ids the model may emit")
        sample = not self.greedy
        return Static(
            greedy=not sample,
            top_k=self.top_k if sample and self.top_k is not None else 0,
            top_p=sample and self.top_p is not None and self.top_p < 1.0,
            repetition_penalty=self.repetition_penalty is not None and self.repetition_penalty != 1.0,
            vocab_limit=vocab_limit,
            suppress=tuple(sorted({int(t) for t in suppress})),
        )

    def values(self) -> dict:
        """The traced part: float32 scalars (same tree structure whatever the settings)."""
        return {
            "temperature": jnp.asarray(self.temperature or 1.0, F32),
            "top_p": jnp.asarray(1.0 if self.top_p is None else self.top_p, F32),
            "repetition_penalty": jnp.asarray(self.repetition_penalty or 1.0, F32),
        }


def mark_seen(seen, tokens):
    """seen [B, V] bool, tokens [B] int -> seen with those ids set (for the repetition penalty)."""
    return seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)


def prompt_seen(ids, mask, vocab: int):
    """ids, mask [B, P] -> [B, V] bool: which ids occur among each row's real prompt tokens."""
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    return jnp.zeros((ids.shape[0], vocab), bool).at[rows, ids].max(mask.astype(bool))


def choose(static: Static, values: dict, logits, key, seen=None):
    """logits [B, V] float32 -> next ids [B] int32. seen [B, V] bool is required when the repetition penalty is on."""
    v = logits.shape[-1]
    if static.vocab_limit < v:  # the padded embedding rows the tokenizer cannot decode
        logits = jnp.where(jnp.arange(v) < static.vocab_limit, logits, -jnp.inf)
    if static.suppress:
        logits = logits.at[:, list(static.suppress)].set(-jnp.inf)
    if static.repetition_penalty:
        p = values["repetition_penalty"]
        logits = jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)
    if static.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / values["temperature"]
    if static.top_k or static.top_p:
        # candidates sorted by logit, descending: the top k, or (top-p alone) the whole vocabulary
        cand, ids = jax.lax.top_k(logits, static.top_k or v)  # [B, K]
        if static.top_p:  # keep the smallest prefix whose probability reaches top_p (always the first)
            probs = jax.nn.softmax(cand, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly before each candidate
            cand = jnp.where(before < values["top_p"], cand, -jnp.inf)
        pick = jax.random.categorical(key, cand, axis=-1)  # [B]
        return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
