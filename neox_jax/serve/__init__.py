"""The OpenAI-compatible server with continuous batching.

    engine.py     the compiled programs over one preallocated KV cache of `slots` rows (admit per prompt bucket,
                  one decode chunk), per-row settings as arrays
    rows.py       per-row sampling (temperature, top-k, top-p, repetition penalty, min_tokens, seeds) and logprobs
    scheduler.py  the background thread: queue -> free slot -> decode chunks -> per-request deltas
    protocol.py   the OpenAI request fields, checked, and the response pieces
    app.py        starlette routes (completions, health, models, metrics); chat.py: chat completions
    service.py    Service (all of it over a loaded model) and ServerThread (uvicorn in a thread)
    metrics.py    Prometheus metrics

Run it with `neox-jax serve --checkpoint CKPT` (docs/serving.md).
"""

from neox_jax.serve.service import ServerThread, Service

__all__ = ["ServerThread", "Service"]
