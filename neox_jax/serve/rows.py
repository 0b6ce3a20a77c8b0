"""The server's per-row sampling settings: every request in the batch has its own temperature, top-k, top-p,
repetition penalty, min_tokens, stop ids and seed, held as [B] / [B, V] arrays in the decode state, so one compiled
program serves every mix. The sampler is generate's (neox_jax.inference.sampling.choose with a per_row Static): a
row's random draw depends on its own seed and how many tokens it has made only (fold_in(key(seed), step)).
Log-probabilities (sampling.logprobs) are those of the model's distribution, as the OpenAI completions API reports
them: a log_softmax of the raw logits (before penalty, temperature, top-k / top-p) over `logprob_rows` rows, by
default all of them (as lm-eval's hf backend, vLLM and neox_jax.scoring normalise), or over the ids the tokenizer can
decode only (Pythia: 50277 of 50304; `neox-jax serve --logprob-vocab tokenizer`). Sampling and the top
log-probabilities listed never include an id the tokenizer cannot decode, either way.
"""

from __future__ import annotations

import numpy as np

from neox_jax.inference import core

TOP_LOGPROBS = core.TOP_LOGPROBS  # the most `logprobs` a request may ask for (OpenAI's limit)


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
