"""Per-row sampling for the server: every request in the batch has its own temperature, top-k, top-p, repetition
penalty, min_tokens, stop ids and seed, held as [B] / [B, V] arrays, so one compiled program serves every mix.

Order as in neox_jax.inference.sampling (Hugging Face's): repetition penalty, then temperature, top-k, top-p. A row's
random
draw depends on its own seed and how many tokens it has made only (fold_in(key(seed), step)), never on its company.
Log-probabilities are those of the model's distribution, as the OpenAI completions API reports them: a log_softmax
of the raw logits (before penalty, temperature, top-k / top-p) over `logprob_rows` rows, by default all of them (as
lm-eval's hf backend, vLLM and neox_jax.scoring normalise), or over the ids the tokenizer can decode only (Pythia:
50277 of 50304; `neox-jax serve --logprob-vocab tokenizer`). Sampling and the top log-probabilities listed never
include an id the tokenizer cannot decode, either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
TOP_LOGPROBS = 5  # the most `logprobs` a request may ask for (OpenAI's limit)


def empty_rows(batch: int, vocab: int) -> dict:
    """The per-row sampling settings of `batch` free slots (numpy; the scheduler fills a row per request)."""
    return {
        "temperature": np.zeros(batch, np.float32),
        "top_p": np.ones(batch, np.float32),
        "top_k": np.zeros(batch, np.int32),
        "repetition_penalty": np.ones(batch, np.float32),
        "min_tokens": np.zeros(batch, np.int32),
        "max_new": np.ones(batch, np.int32),
        "logprobs": np.zeros(batch, bool),
        "stop_mask": np.zeros((batch, vocab), bool),
        "key": np.zeros((batch, 2), np.uint32),
    }


def seed_key(seed: int) -> np.ndarray:
    """The threefry key data jax.random.key(seed) makes, built on the host (no device op, nothing to compile)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def log_probs(logits, vocab_limit: int, logprob_rows: int | None = None):
    """logits [..., V] -> log_softmax over the first `logprob_rows` rows (None: all V), and -inf at ids >= vocab_limit
    (which the tokenizer cannot decode, so they are never listed)."""
    v = logits.shape[-1]
    ids = jnp.arange(v)
    lps = jax.nn.log_softmax(logits if logprob_rows in (None, v) else jnp.where(ids < logprob_rows, logits, -jnp.inf))
    return jnp.where(ids < vocab_limit, lps, -jnp.inf)


def choose_rows(logits, rows: dict, made, seen, vocab_limit: int, logprob_rows: int | None = None):
    """logits [B, V] float32; rows: the settings above as arrays (key [B, 2] uint32 key data; logprobs [B] bool:
    whether the row wants log-probabilities, else they are zeros); made [B] int32 tokens
    each row has made so far (the step of its random stream, and what min_tokens counts); seen [B, V] bool;
    vocab_limit: the ids the tokenizer can decode (the only ones chosen); logprob_rows: see log_probs.
    Returns tokens [B] int32, their logprobs [B] float32, and the top TOP_LOGPROBS ids / logprobs [B, K]."""
    b, v = logits.shape
    raw = logits
    allowed = jnp.arange(v) < vocab_limit  # the padded embedding rows the tokenizer cannot decode
    logits = jnp.where(allowed, logits, -jnp.inf)
    p = rows["repetition_penalty"][:, None]  # 1: off (x / 1 and x * 1 are exact)
    x = jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)
    x = jnp.where((made < rows["min_tokens"])[:, None] & rows["stop_mask"], -jnp.inf, x)  # no stop before min_tokens
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
    sampling = rows["temperature"] > 0

    def sample(x):
        x = x / jnp.where(sampling, rows["temperature"], 1.0)[:, None]
        cand, ids = jax.lax.top_k(x, v)  # [B, V] sorted, descending
        k = jnp.where(rows["top_k"] > 0, rows["top_k"], v)[:, None]
        cand = jnp.where(jnp.arange(v)[None] < k, cand, -jnp.inf)
        probs = jax.nn.softmax(cand, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # the mass strictly before each candidate (the first always stays)
        cand = jnp.where(before < rows["top_p"][:, None], cand, -jnp.inf)
        keys = jax.vmap(lambda kd, n: jax.random.fold_in(jax.random.wrap_key_data(kd), n))(rows["key"], made)
        pick = jax.vmap(jax.random.categorical)(keys, cand)  # [B]
        drawn = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(sampling, drawn, greedy)

    # the sort over the vocabulary only runs when some row samples
    tokens = jax.lax.cond(jnp.any(sampling), sample, lambda _: greedy, x)

    def logprobs(raw):
        lps = log_probs(raw, vocab_limit, logprob_rows)
        top_lp, top_ids = jax.lax.top_k(lps, TOP_LOGPROBS)
        return jnp.take_along_axis(lps, tokens[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp

    def none(logits):
        return jnp.zeros(b, F32), jnp.zeros((b, TOP_LOGPROBS), jnp.int32), jnp.zeros((b, TOP_LOGPROBS), F32)

    # log-probabilities (a top-k over the vocabulary) only when some row asked for them: it cost ~10% of a step
    return tokens, *jax.lax.cond(jnp.any(rows["logprobs"]), logprobs, none, raw)
