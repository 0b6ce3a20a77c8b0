"""The HTTP side (starlette, run by uvicorn): OpenAI-style routes over the Scheduler.

    GET  /health               200 once the model is loaded and every program compiled (503 before, or if it failed)
    GET  /v1/models            the one served model
    POST /v1/completions       see protocol.py; `stream` sends server-sent events ending `data: [DONE]`
    POST /v1/chat/completions  when the checkpoint has a chat template (else 404, saying so)
    GET  /metrics              Prometheus text

The async handlers never call JAX: they put requests on the scheduler's queue and await their deltas on an asyncio
queue that the scheduler thread feeds (loop.call_soon_threadsafe). A client that disconnects cancels its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from neox_jax.serve import chat
from neox_jax.serve import protocol as P
from neox_jax.serve.http import Run, _sse, _usage, error, read_json
from neox_jax.serve.scheduler import Delta

log = logging.getLogger("neox_jax.serve")


async def completions(request: HttpRequest) -> Response:
    svc = request.app.state.svc
    try:
        body = await read_json(request)
        P.check_model(body, svc.name)
        prompts = P.prompts_of(body, svc.tok, svc.vocab_size)
        st = P.settings_of(body, svc.tok, svc.vocab_size)
        for i, p in enumerate(prompts):
            P.check_length(len(p), st.max_tokens, svc.max_model_len, i)
        run = Run(svc, request, prompts, st)
        run.submit()
    except P.ApiError as e:
        return error(e, svc)
    rid, created = P.new_id("cmpl"), P.now()
    texts = [svc.tok.decode(p) if st.echo else "" for p in prompts]
    lps = [P.LogprobBuilder(svc.tok, st.logprobs) if st.logprobs is not None else None for _ in prompts]
    made, reasons = [0] * len(prompts), [None] * len(prompts)

    def piece(i, d: Delta, first_echo: bool):
        """The text and logprobs a delta adds to choice i (the echoed prompt first, once)."""
        text, lp = d.text, None
        if lps[i] is not None:
            part = {}
            if first_echo:
                part = lps[i].add(prompts[i], [None] + list(d.prompt_logprobs or []))
            new = lps[i].add(d.ids, d.logprobs or [])
            lp = {k: part.get(k, []) + new[k] for k in new}
        if first_echo:
            text = svc.tok.decode(prompts[i]) + text
        return text, lp

    if st.stream:

        async def events():
            started = [False] * len(prompts)
            async for i, d in run.deltas():
                echo = st.echo and not started[i]
                started[i] = True
                made[i] += len(d.ids)
                text, lp = piece(i, d, echo)
                if text or lp or d.finish_reason:
                    yield _sse(
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": created,
                            "model": svc.name,
                            "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": d.finish_reason}],
                        }
                    )
            if st.include_usage:
                yield _sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": svc.name,
                        "choices": [],
                        "usage": _usage(prompts, sum(made)),
                    }
                )
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    texts = [""] * len(prompts)
    started = [False] * len(prompts)
    async for i, d in run.deltas():
        if d.error:
            return error(P.ApiError(d.error, status=503, kind="server_error"), svc)
        echo = st.echo and not started[i]
        started[i] = True
        made[i] += len(d.ids)
        text, _ = piece(i, d, echo)
        texts[i] += text
        reasons[i] = d.finish_reason or reasons[i]
    choices = [
        {"index": i, "text": texts[i], "logprobs": lps[i].data if lps[i] else None, "finish_reason": reasons[i]}
        for i in range(len(prompts))
    ]
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": svc.name,
            "choices": choices,
            "usage": _usage(prompts, sum(made)),
        }
    )


async def health(request: HttpRequest) -> Response:
    s = request.app.state.svc.scheduler
    if s.failed is not None:
        return JSONResponse({"status": "failed", "error": repr(s.failed)}, status_code=503)
    if not s.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def models(request: HttpRequest) -> Response:
    svc = request.app.state.svc
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": svc.name,
                    "object": "model",
                    "created": svc.created,
                    "owned_by": "neox-jax",
                    "max_model_len": svc.max_model_len,
                }
            ],
        }
    )


async def metrics(request: HttpRequest) -> Response:
    m = request.app.state.svc.metrics
    return Response(m.render(), media_type=m.content_type)


async def not_found(request: HttpRequest, exc) -> Response:
    """404 / 405, in OpenAI's error shape and counted in request_errors_total like every other error."""
    status = getattr(exc, "status_code", 404)
    return error(P.ApiError(f"no route {request.method} {request.url.path}", status=status), request.app.state.svc)


def build_app(svc, drain_timeout: float = 30.0) -> Starlette:
    """svc: a Service (see neox_jax.serve.service): scheduler, tokenizer, metrics, name, limits."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        svc.scheduler.start()
        yield
        await asyncio.to_thread(svc.scheduler.shutdown, drain_timeout)

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/metrics", metrics),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.svc = svc
    return app
