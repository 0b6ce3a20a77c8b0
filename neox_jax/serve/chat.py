"""POST /v1/chat/completions: messages -> a prompt through the checkpoint's chat template (jinja, as transformers
renders it), then a completion. Without a template the route answers 404 and says how to give one."""

from __future__ import annotations

import json
from pathlib import Path

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from neox_jax.serve import protocol as P
from neox_jax.serve import rows as R

TEMPLATE_FILE = "chat_template.jinja"


def find_template(ckpt_dir) -> str | None:
    """The chat template a checkpoint carries: chat_template.jinja, or tokenizer_config.json's "chat_template"."""
    d = Path(ckpt_dir)
    if (d / TEMPLATE_FILE).is_file():
        return (d / TEMPLATE_FILE).read_text()
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        t = json.loads(cfg.read_text()).get("chat_template")
        return t if isinstance(t, str) else None
    return None


def compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render(template, messages, tok) -> str:
    from jinja2 import TemplateError

    if not isinstance(messages, list) or not messages:
        raise P.ApiError("'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise P.ApiError(f"messages[{i}] must be an object with a 'role'", param="messages")
        c = m.get("content")
        if isinstance(c, list):  # content parts: text only
            if not all(isinstance(x, dict) and x.get("type") == "text" for x in c):
                raise P.ApiError(f"messages[{i}]: only text content parts are supported", param="messages")
            c = "".join(x.get("text", "") for x in c)
        if not isinstance(c, str):
            raise P.ApiError(f"messages[{i}].content must be a string", param="messages")
        clean.append({"role": m["role"], "content": c})
    eos = tok.decode([tok.eos_id])
    try:
        return template.render(messages=clean, add_generation_prompt=True, bos_token=eos, eos_token=eos)
    except TemplateError as e:
        raise P.ApiError(f"the chat template refused the messages: {e}", param="messages") from None


def _chat_logprobs(tok, ids, entries, k: int):
    out = []
    for t, (lp, top_ids, top_lps) in zip(ids, entries):
        s = tok.decode([t])
        out.append(
            {
                "token": s,
                "logprob": lp,
                "bytes": list(s.encode()),
                "top_logprobs": [
                    {"token": tok.decode([i]), "logprob": v, "bytes": list(tok.decode([i]).encode())}
                    for i, v in zip(top_ids[:k], top_lps[:k])
                ],
            }
        )
    return out


async def chat_completions(request: HttpRequest) -> Response:
    from neox_jax.serve.http import Run, _sse, _usage, error, read_json

    svc = request.app.state.svc
    try:
        if svc.chat_template is None:
            raise P.ApiError(
                "this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json's "
                "chat_template); use /v1/completions, or start the server with --chat-template FILE",
                status=404,
                code="chat_template_missing",
            )
        body = await read_json(request)
        P.check_model(body, svc.name)
        text = render(svc.chat_template, body.get("messages"), svc.tok)
        prompt = svc.tok.encode(text)
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        want_lp = body.get("logprobs", False)
        if not isinstance(want_lp, bool):
            raise P.ApiError("'logprobs' must be a boolean in chat completions", param="logprobs")
        top = P.number(body, "top_logprobs", 0, lo=0, hi=R.TOP_LOGPROBS, integer=True)  # errors name top_logprobs
        if top and not want_lp:
            raise P.ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        st = P.settings_of(
            {**body, "logprobs": top if want_lp else None, "echo": False},
            svc.tok,
            svc.vocab_size,
            max_tokens_key=key,
            default_max=max(1, svc.max_model_len - len(prompt)),
        )
        P.check_length(len(prompt), st.max_tokens, svc.max_model_len)
        run = Run(svc, request, [prompt], st)
        run.submit()
    except P.ApiError as e:
        return error(e, svc)
    rid, created = P.new_id("chatcmpl"), P.now()
    head = {"id": rid, "created": created, "model": svc.name}

    if st.stream:

        async def events():
            made = 0
            yield _sse(
                {
                    **head,
                    "object": "chat.completion.chunk",
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
            async for _, d in run.deltas():
                made += len(d.ids)
                lp = {"content": _chat_logprobs(svc.tok, d.ids, d.logprobs, st.logprobs)} if d.logprobs else None
                delta = {"content": d.text} if d.text else {}
                if delta or d.finish_reason or lp:
                    yield _sse(
                        {
                            **head,
                            "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}],
                        }
                    )
            if st.include_usage:
                yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage([prompt], made)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    text, made, reason, lps = "", 0, None, []
    async for _, d in run.deltas():
        if d.error:
            return error(P.ApiError(d.error, status=503, kind="server_error"), svc)
        text += d.text
        made += len(d.ids)
        reason = d.finish_reason or reason
        if d.logprobs:
            lps += _chat_logprobs(svc.tok, d.ids, d.logprobs, st.logprobs)
    return JSONResponse(
        {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": {"content": lps} if want_lp else None,
                    "finish_reason": reason,
                }
            ],
            "usage": _usage([prompt], made),
        }
    )
