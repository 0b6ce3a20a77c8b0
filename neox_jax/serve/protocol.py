"""The OpenAI wire format: request bodies -> checked generation settings, and results -> response objects.

Completions take `prompt` as a string, a list of strings, a list of token ids or a list of id lists (one choice per
prompt), `max_tokens` (default 16), `temperature` (default 1), `top_p`, `stop`, `seed`, `stream`, `logprobs` (0..5),
`echo`; `n` / `best_of` above 1 are refused; and vLLM's `top_k`, `repetition_penalty`, `min_tokens`, `ignore_eos`,
`stop_token_ids`. Any bad value is an `ApiError` (status 400) naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time

import numpy as np

from neox_jax.inference.sampling import MIN_TEMPERATURE, SEED_LIMIT
from neox_jax.serve import rows as R

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class ApiError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.kind, self.code = message, status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Settings:
    """One request's checked settings (shared by its prompts)."""

    max_tokens: int
    row: dict  # numpy per-row sampling settings, as rows.empty_rows (without max_new / key / stop_mask filled)
    stops: list[str]
    stop_ids: list[int]
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool
    seed: int  # prompt i of the request samples with seed + i


def number(body, name, default, lo=None, hi=None, lo_open=False, integer=False):
    v = body.get(name, default)
    if v is None:
        v = default
    if v is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v):
        raise ApiError(f"'{name}' must be {kind}, got {v!r}", param=name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ApiError(f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {v!r}", param=name)
    if hi is not None and v > hi:
        raise ApiError(f"'{name}' must be <= {hi}, got {v!r}", param=name)
    return v


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(
            f"The model '{model}' does not exist; this server serves '{served}'", param="model", code="model_not_found"
        )


def prompts_of(body: dict, tok, vocab_size: int) -> list[list[int]]:
    p = body.get("prompt")
    if isinstance(p, str) or (
        isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    ):
        p = [p]
    if not isinstance(p, list) or not p:
        raise ApiError(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists (non-empty)",
            param="prompt",
        )
    out = []
    for i, x in enumerate(p):
        if isinstance(x, str):
            ids = tok.encode(x)
        elif isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            ids = list(x)
            bad = [t for t in ids if not 0 <= t < min(vocab_size, tok.vocab_size)]
            if bad:
                raise ApiError(
                    f"prompt {i}: token ids {bad[:5]} outside [0, {min(vocab_size, tok.vocab_size)})", param="prompt"
                )
        else:
            raise ApiError(
                f"prompt {i} must be a string or a list of token ids, got {type(x).__name__}", param="prompt"
            )
        if not ids:
            raise ApiError(f"prompt {i} is empty (no tokens)", param="prompt")
        out.append(ids)
    return out


def settings_of(
    body: dict, tok, vocab_size: int, max_tokens_key: str = "max_tokens", default_max: int | None = DEFAULT_MAX_TOKENS
) -> Settings:
    for name in ("n", "best_of"):
        if number(body, name, 1, lo=1, integer=True) != 1:
            raise ApiError(
                f"'{name}' > 1 is not supported; send the request several times (with different seeds)", param=name
            )
    for name in ("presence_penalty", "frequency_penalty"):
        if number(body, name, 0.0) != 0:
            raise ApiError(f"'{name}' is not supported (use repetition_penalty)", param=name)
    if body.get("logit_bias"):
        raise ApiError("'logit_bias' is not supported", param="logit_bias")
    if body.get("suffix"):
        raise ApiError("'suffix' is not supported", param="suffix")
    max_tokens = number(body, max_tokens_key, default_max, lo=1, integer=True)
    temperature = number(body, "temperature", 1.0, lo=0)
    if 0 < temperature < MIN_TEMPERATURE:  # logits / temperature overflows float32: NaN probabilities
        raise ApiError(
            f"'temperature' {temperature} is too small to sample with in float32: use 0 (greedy, the same "
            f"choice) or >= {MIN_TEMPERATURE:g}",
            param="temperature",
        )
    top_p = number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)
    top_k = number(body, "top_k", -1, lo=-1, integer=True)
    if top_k > vocab_size:
        raise ApiError(f"'top_k' must be <= the vocabulary size {vocab_size}, got {top_k}", param="top_k")
    rep = number(body, "repetition_penalty", 1.0, lo=0, lo_open=True)
    min_tokens = number(body, "min_tokens", 0, lo=0, integer=True)
    if max_tokens is not None and min_tokens > max_tokens:
        raise ApiError(f"'min_tokens' {min_tokens} exceeds max_tokens {max_tokens}", param="min_tokens")
    seed = number(body, "seed", None, lo=-SEED_LIMIT, hi=SEED_LIMIT - 1, integer=True)  # int64, as OpenAI's
    logprobs = body.get("logprobs")
    if logprobs is not None and (
        isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= R.TOP_LOGPROBS
    ):
        raise ApiError(f"'logprobs' must be an integer in [0, {R.TOP_LOGPROBS}], got {logprobs!r}", param="logprobs")
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError("'stop' must be a non-empty string or a list of them", param="stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in stop_ids):
        raise ApiError(f"'stop_token_ids' must be a list of ids in [0, {vocab_size})", param="stop_token_ids")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError("'ignore_eos' must be a boolean", param="ignore_eos")
    stop_ids = sorted(set(stop_ids) | (set() if ignore_eos else {tok.eos_id}))
    stream, echo = body.get("stream", False), body.get("echo", False)
    if not isinstance(stream, bool) or not isinstance(echo, bool):
        raise ApiError(
            "'stream' and 'echo' must be booleans", param="stream" if not isinstance(stream, bool) else "echo"
        )
    opts = body.get("stream_options") or {}
    seed = secrets.randbits(62) if seed is None else seed
    row = {k: v[0] for k, v in R.empty_rows(1, vocab_size).items()}
    row.update(
        temperature=np.float32(temperature),
        top_p=np.float32(top_p),
        top_k=np.int32(max(top_k, 0)),
        repetition_penalty=np.float32(rep),
        min_tokens=np.int32(min_tokens),
        logprobs=np.bool_(logprobs is not None),
        key=R.seed_key(seed),
    )
    row["stop_mask"][stop_ids] = True
    return Settings(
        max_tokens,
        row,
        stops,
        stop_ids,
        logprobs,
        echo,
        stream,
        bool(isinstance(opts, dict) and opts.get("include_usage")),
        seed,
    )


def check_length(n_prompt: int, max_tokens: int, max_model_len: int, i: int = 0) -> None:
    if n_prompt + max_tokens > max_model_len:
        raise ApiError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in prompt {i}, {max_tokens} for the completion). "
            f"Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class LogprobBuilder:
    """The completions `logprobs` object for one choice, grown piece by piece: tokens, token_logprobs, top_logprobs,
    text_offset (character offsets into the choice's text, echoed prompt included)."""

    def __init__(self, tok, k: int, offset: int = 0):
        self.tok, self.k, self.offset = tok, k, offset
        self.data = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, ids, entries) -> dict:
        """ids with entries [(logprob, top ids, top logprobs)] (None for the first prompt token). Returns the part
        just added (for a stream chunk)."""
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, e in zip(ids, entries):
            s = self.tok.decode([t])
            part["tokens"].append(s)
            part["text_offset"].append(self.offset)
            self.offset += len(s)
            if e is None:
                part["token_logprobs"].append(None)
                part["top_logprobs"].append(None)
                continue
            lp, top_ids, top_lps = e
            part["token_logprobs"].append(lp)
            top = {self.tok.decode([i]): v for i, v in zip(top_ids[: self.k], top_lps[: self.k])}
            top.setdefault(s, lp)  # the chosen token is always listed (as vLLM does)
            part["top_logprobs"].append(top)
        for key, v in part.items():
            self.data[key].extend(v)
        return part
