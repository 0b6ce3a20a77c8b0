"""What every route shares: OpenAI-style errors, the JSON body, one HTTP request's generation requests (Run), the
usage block and server-sent events. Apart from app.py so that chat.py can use it without an import circle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import numpy as np
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from neox_jax.serve import protocol as P
from neox_jax.serve import rows as R
from neox_jax.serve.scheduler import Delta, NotReady, QueueFull, Request, ShuttingDown

log = logging.getLogger("neox_jax.serve")


def error(e: P.ApiError, svc=None) -> JSONResponse:
    if svc is not None:
        svc.metrics.errors.labels(str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status)


async def read_json(request: HttpRequest) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise P.ApiError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise P.ApiError("the request body must be a JSON object")
    return body


class Run:
    """One HTTP request's generation requests (one per prompt), their deltas, and their cancellation."""

    def __init__(self, svc, http: HttpRequest, prompts: list[list[int]], st: P.Settings):
        if getattr(svc, "draft_tokens", None) is not None and st.row["repetition_penalty"] != 1:
            raise P.ApiError(
                "'repetition_penalty' is not supported by this server: it decodes with a draft model (speculative "
                "decoding), and the penalty's distribution changes along the drafted tokens",
                param="repetition_penalty",
            )
        self.svc, self.http, self.prompts, self.st = svc, http, prompts, st
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

        def deliver_to(i):
            def deliver(d: Delta):
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, d))

            return deliver

        self.reqs = []
        for i, ids in enumerate(prompts):
            row = {**st.row, "max_new": np.int32(st.max_tokens), "key": R.seed_key(st.seed + i)}
            self.reqs.append(
                Request(
                    ids,
                    st.max_tokens,
                    row,
                    st.stops,
                    st.stop_ids,
                    deliver_to(i),
                    logprobs=st.logprobs,
                    prompt_logprobs=st.echo and st.logprobs is not None,
                )
            )

    def submit(self) -> None:
        """Queues every prompt, or none: a full queue (429), a model still loading or a stopping server (503) cancels
        those already in."""
        try:
            for r in self.reqs:
                self.svc.scheduler.submit(r)
        except (QueueFull, ShuttingDown, NotReady) as e:
            self.cancel()
            raise P.ApiError(str(e), status=429 if isinstance(e, QueueFull) else 503, kind="server_error") from None

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancel()

    async def _watch(self) -> None:
        while (await self.http.receive())["type"] != "http.disconnect":
            pass
        log.info("client disconnected: cancelling %d request(s)", len(self.reqs))
        self.cancel()

    async def deltas(self):
        """(prompt index, Delta) until every prompt has finished; cancels what is left if the consumer stops."""
        watcher = asyncio.create_task(self._watch())
        left = len(self.reqs)
        try:
            while left:
                i, d = await self.queue.get()
                left -= d.finish_reason is not None
                yield i, d
        finally:
            watcher.cancel()
            self.cancel()


def _usage(prompts, completion_tokens) -> dict:
    n = sum(map(len, prompts))
    return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
