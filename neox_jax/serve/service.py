"""A served model: the loaded NeoX -> Engine + Scheduler + Metrics + the names and limits the routes need, and a
way to run the app in a background thread (tests, benchmarks, notebooks).

    svc = Service.from_model(neox_jax.load(ckpt), max_batch=8)
    with ServerThread(svc, port=0) as srv:      # uvicorn on 127.0.0.1, a free port
        print(srv.url)                          # http://127.0.0.1:PORT  (ready: compiled)
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

from neox_jax.errors import NeoXError
from neox_jax.serve import chat
from neox_jax.serve.engine import Engine
from neox_jax.serve.metrics import Metrics
from neox_jax.serve.scheduler import Scheduler
from neox_jax.store.tokenizer import Tokenizer

LOGPROB_VOCABS = ("all", "tokenizer")  # what server log-probabilities are normalised over (see sampling.log_probs)


@dataclasses.dataclass
class Service:
    scheduler: Scheduler
    tok: Tokenizer
    metrics: Metrics
    name: str
    vocab_size: int
    max_model_len: int
    chat_template: object = None  # a compiled jinja template, or None
    draft_tokens: int | None = None  # k with a draft model (speculative decoding), else None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_model(
        cls,
        lm,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_model_len: int | None = None,
        chunk: int = 8,
        name: str | None = None,
        tokenizer: Tokenizer | None = None,
        chat_template: str | None = None,
        logprob_vocab: str = "all",
        draft=None,
        draft_tokens: int = 4,
    ) -> Service:
        """lm: a neox_jax.NeoX. chat_template: jinja source (default: the checkpoint's, if it has one).
        logprob_vocab: "all" (log-probabilities normalised over every output row, as lm-eval's hf backend, vLLM and
        neox-jax evaluate do) or "tokenizer" (over the ids the tokenizer has only); see sampling.log_probs.
        draft: a smaller neox_jax.NeoX with the same tokenizer, proposing draft_tokens tokens a round (speculative
        decoding, serve.spec_engine; `chunk` then counts rounds)."""
        tok = tokenizer or lm.tokenizer
        if tok is None:
            raise NeoXError(f"{lm.path}: the checkpoint has no tokenizer.json; pass --tokenizer FILE")
        cfg = lm.config
        max_model_len = max_model_len or cfg.max_position_embeddings
        if not 2 <= max_model_len <= cfg.max_position_embeddings:
            raise NeoXError(
                f"--max-model-len {max_model_len}: expected 2..{cfg.max_position_embeddings} (the "
                f"model's max_position_embeddings)"
            )
        if logprob_vocab not in LOGPROB_VOCABS:
            raise NeoXError(f"--logprob-vocab {logprob_vocab!r}: expected one of {', '.join(LOGPROB_VOCABS)}")
        vocab_limit = min(cfg.vocab_size, tok.vocab_size)
        if max_batch < 1 or max_queue < 1:
            raise NeoXError(f"--max-batch {max_batch} and --max-queue {max_queue} must be >= 1")
        kw = dict(
            slots=max_batch,
            max_model_len=max_model_len,
            vocab_limit=vocab_limit,
            logprob_rows=cfg.vocab_size if logprob_vocab == "all" else vocab_limit,
            chunk=chunk,
            pad_id=tok.pad_id,
            mesh=lm.mesh,
        )
        if draft is None:
            engine = Engine(cfg, lm.params, **kw)
        else:
            from neox_jax.inference.speculative_driver import check_tokenizers
            from neox_jax.serve.spec_engine import SpecEngine

            if draft.tokenizer is not None:  # (a draft without one reads the same ids; its rows are checked below)
                check_tokenizers(tok, draft.tokenizer)
            engine = SpecEngine(
                cfg, lm.params, draft_cfg=draft.config, draft_params=draft.params, draft_tokens=draft_tokens, **kw
            )
        metrics = Metrics(engine.slots, max_queue, draft_tokens=engine.k if draft is not None else None)
        if chat_template is None and lm.path:
            chat_template = chat.find_template(lm.path)
        name = name or (Path(lm.path).name if lm.path else "neox-jax")
        return cls(
            Scheduler(engine, tok, metrics, max_queue),
            tok,
            metrics,
            name,
            cfg.vocab_size,
            max_model_len,
            chat.compile_template(chat_template) if chat_template else None,
            draft_tokens=engine.k if draft is not None else None,
        )


class ServerThread:
    """uvicorn serving the app in a daemon thread on host:port (port 0: a free one); `stop()` (or leaving the with
    block) asks it to exit and joins it."""

    def __init__(
        self,
        svc: Service,
        host: str = "127.0.0.1",
        port: int = 0,
        drain_timeout: float = 10.0,
        ready_timeout: float = 600.0,
    ):
        import uvicorn

        from neox_jax.serve.app import build_app

        self.svc = svc
        config = uvicorn.Config(
            build_app(svc, drain_timeout),
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=drain_timeout,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.ready_timeout = ready_timeout

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> ServerThread:
        self.thread.start()
        end = time.monotonic() + self.ready_timeout
        while not (self.server.started and self.svc.scheduler.ready.is_set()):
            if self.svc.scheduler.failed is not None:
                raise RuntimeError("the model failed to start") from self.svc.scheduler.failed
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
