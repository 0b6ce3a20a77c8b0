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

    greedy: bool  # every row greedy: the program has no sampling code at all
    top_k: int  # candidates kept per row (0: the whole vocabulary); per_row rows may cut further with their own top_k
    top_p: bool
    repetition_penalty: bool
    vocab_limit: int  # ids >= this are never emitted
    per_row: bool = False  # rows mix settings (the server): see `choose`
    logprob_rows: int | None = None  # what log-probabilities are normalised over (see `logprobs`)
    suppress: tuple[int, ...] = ()  # ids never emitted (HF's min_length keeps the end-of-text id out this way)


def per_row_static(vocab_limit: int, logprob_rows: int | None = None) -> Static:
    """The server's: every row its own temperature (0: greedy), top-k, top-p, penalty, min_tokens, seed."""
    return Static(False, 0, True, True, vocab_limit, per_row=True, logprob_rows=logprob_rows)


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


def _col(x):
    """A setting, one scalar for every row or [B] per row -> broadcastable against [B, V]."""
    return x if jnp.ndim(x) == 0 else x[:, None]


def choose(static: Static, values: dict, logits, key, seen=None, made=None, vocab_major: bool = False):
    """logits [B, V] float32 -> next ids [B] int32: the one sampler of generate, the server and speculative decoding.

    values: temperature, top_p, repetition_penalty as float32 scalars or [B] per row (SamplingParams.values(), or the
    per-row settings of serve.rows). seen [B, V] bool is required when the repetition penalty is on. With
    static.per_row (the server) values also has top_k [B] (0: off), min_tokens [B], stop_mask [B, V]; a row with
    temperature 0 is greedy, the others sample, and the sort over the vocabulary only runs when some row samples.
    key: one PRNG key for the batch (one draw over [B]); per_row: key data [B, 2] uint32 per row, folded with made
    [B] (tokens the row has made), so a row's draw depends on its own seed and step only, never on its company.
    vocab_major: the logits are the transpose of a [V, B] product (the transposed layout's output layer): the greedy
    pick then runs over that layout (see argmax)."""
    v = logits.shape[-1]
    x = logits
    if static.vocab_limit < v or static.per_row:  # the padded embedding rows the tokenizer cannot decode
        x = jnp.where(jnp.arange(v) < static.vocab_limit, x, -jnp.inf)
    if static.suppress:
        x = x.at[:, list(static.suppress)].set(-jnp.inf)
    if static.repetition_penalty:  # a penalty of 1 is exact: x / 1 and x * 1
        p = _col(values["repetition_penalty"])
        x = jnp.where(seen, jnp.where(x > 0, x / p, x * p), x)
    if static.per_row:  # no stop id before min_tokens
        x = jnp.where((made < values["min_tokens"])[:, None] & values["stop_mask"], -jnp.inf, x)
    greedy = argmax(x) if vocab_major else jnp.argmax(x, axis=-1).astype(jnp.int32)
    if static.greedy:
        return greedy
    if not static.per_row:
        return _sample(static, values, x, key, None)
    sampling = values["temperature"] > 0
    return jax.lax.cond(
        jnp.any(sampling),
        lambda x: jnp.where(sampling, _sample(static, values, x, key, made), greedy),
        lambda _: greedy,
        x,
    )


def argmax(x):
    """jnp.argmax(x, axis=-1) for x [B, V] as int32 (the first of equal maxima; a NaN counts as the largest), by
    halving the vocabulary in adjacent pairs while it is even, then one argmax over what is left. XLA CPU runs a
    variadic argmax reduction one element at a time (0.7 ms over [16, 50304] float32); the halvings are vectorised
    selects over the [V, B] layout the transposed layout's output layer leaves (model/rowmatmul.py), half the time.
    Not for the logits of a stored-layout [B, D] x [D, V] product: XLA folds x.T into that dot, and in bfloat16 CPU
    has no kernel for the folded form."""
    xt = x.T  # [V, B]
    ids = jnp.broadcast_to(jnp.arange(xt.shape[0], dtype=jnp.int32)[:, None], xt.shape)
    while xt.shape[0] % 2 == 0 and xt.shape[0] > PAIRS_DOWN_TO:
        a, b = xt.reshape(-1, 2, xt.shape[1]), ids.reshape(-1, 2, xt.shape[1])  # [V/2, 2, B]
        first = (a[:, 0] >= a[:, 1]) | jnp.isnan(a[:, 0])  # ties and NaNs keep the lower id
        xt, ids = jnp.where(first, a[:, 0], a[:, 1]), jnp.where(first, b[:, 0], b[:, 1])
        xt, ids = jax.lax.optimization_barrier((xt, ids))  # one fusion per halving
    at = jnp.argmax(xt, axis=0)  # [B]
    return jnp.take_along_axis(ids, at[None], axis=0)[0]


PAIRS_DOWN_TO = 512  # halving below this many ids gains nothing over one reduction


def _candidates(static: Static, values: dict, x):
    """Temperature, then the top-k / top-p cuts: x [B, V] -> (candidate logits [B, K], their ids [B, K]), or
    (x / temperature, None) when nothing is cut."""
    v = x.shape[-1]
    t = values["temperature"]
    x = x / _col(jnp.where(t > 0, t, 1.0) if static.per_row else t)
    if not (static.top_k or static.top_p or static.per_row):
        return x, None
    # candidates sorted by logit, descending: the top k, or the whole vocabulary
    k = static.top_k or v
    cand, ids = jax.lax.top_k(x, k)  # [B, K]
    if static.per_row:  # each row's own top_k (0: off)
        row_k = jnp.where(values["top_k"] > 0, values["top_k"], k)[:, None]
        cand = jnp.where(jnp.arange(k)[None] < row_k, cand, -jnp.inf)
    if static.top_p:  # keep the smallest prefix whose probability reaches top_p (always the first)
        probs = jax.nn.softmax(cand, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly before each candidate
        cand = jnp.where(before < _col(values["top_p"]), cand, -jnp.inf)
    return cand, ids


def _sample(static: Static, values: dict, x, key, made):
    """The cuts (see _candidates), then one draw per row (see choose)."""
    cand, ids = _candidates(static, values, x)
    if ids is None:
        return draw(key, cand, made).astype(jnp.int32)
    return jnp.take_along_axis(ids, draw(key, cand, made)[:, None], axis=-1)[:, 0].astype(jnp.int32)


def processed_logits(static: Static, values: dict, logits):
    """logits [..., V] float32 (penalty and vocabulary mask already applied, or not wanted) -> the logits `choose`
    draws from: temperature, top-k and top-p applied, the excluded ids -inf (their softmax is the distribution a
    speculative acceptance test compares). Batch-uniform statics only."""
    shape, v = logits.shape, logits.shape[-1]
    cand, ids = _candidates(static, values, logits.reshape(-1, v))
    if ids is not None:
        rows = jnp.arange(cand.shape[0])[:, None]
        cand = jnp.full((cand.shape[0], v), -jnp.inf, cand.dtype).at[rows, ids].set(cand)
    return cand.reshape(shape)


def row_keys(key_data, n):
    """Per row: key data [B, 2] folded with n [B] (or one int for every row) -> keys [B]: a row's draws depend on its
    own seed and n only."""
    n = jnp.broadcast_to(n, key_data.shape[:1])
    return jax.vmap(lambda kd, i: jax.random.fold_in(jax.random.wrap_key_data(kd), i))(key_data, n)


def draw(key, logits, made):
    """One categorical draw per row of logits [B, K]: from one key (made None) or per-row key data folded with made."""
    if made is None:
        return jax.random.categorical(key, logits, axis=-1)
    return jax.vmap(jax.random.categorical)(row_keys(key, made), logits)


def log_probs(logits, vocab_limit: int, logprob_rows: int | None = None):
    """logits [..., V] -> log_softmax over the first `logprob_rows` rows (None: all V), and -inf at ids >= vocab_limit
    (which the tokenizer cannot decode, so they are never listed)."""
    v = logits.shape[-1]
    ids = jnp.arange(v)
    lps = jax.nn.log_softmax(logits if logprob_rows in (None, v) else jnp.where(ids < logprob_rows, logits, -jnp.inf))
    return jnp.where(ids < vocab_limit, lps, -jnp.inf)


def logprobs(logits, tokens, k: int, vocab_limit: int, logprob_rows: int | None = None):
    """The model's log-probabilities of tokens [B] (see log_probs), and the top k ids / log-probabilities [B, k]."""
    lps = log_probs(logits, vocab_limit, logprob_rows)
    top_lp, top_ids = jax.lax.top_k(lps, k)
    return jnp.take_along_axis(lps, tokens[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp
