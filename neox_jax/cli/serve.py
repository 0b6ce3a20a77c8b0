"""Serve a checkpoint over an OpenAI-compatible HTTP API with continuous batching.

Requests share `--max-batch` decode slots over one preallocated KV cache of `--max-model-len` positions; a new request
is prefilled into a free slot between decode chunks, a finished or cancelled one frees its slot at once. Every program
is compiled before /health answers 200, so no request waits on a compile.

examples:
  neox-jax serve --checkpoint ckpt/pythia-160m --port 8000
  neox-jax serve --checkpoint ckpt/pythia-1.4b --draft ckpt/pythia-160m --draft-tokens 4   # speculative decoding
  neox-jax serve --checkpoint ckpt/neox-20b --dtype bfloat16 --mesh model=8 --max-batch 16 --max-model-len 2048
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "pythia-160m", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with a chat template),
GET /metrics. SIGTERM stops taking requests, lets running ones finish for --drain-timeout seconds, cancels the
rest and exits 0 (Ctrl-C does the same and exits 130). See docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import signal

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from neox_jax.parallel import distributed
    from neox_jax.store import compile_cache

    p.add_argument(
        "--checkpoint",
        required=True,
        help="a neox-jax checkpoint directory, or a hub id org/name (converted once, cached)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="decode slots: requests generating at once (default 8)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a slot before new ones get 429 (default 64)"
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="positions per slot: prompt + max_tokens (default: the model's max_position_embeddings)",
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=8,
        help="decode steps (with --draft: rounds) between admissions / stream updates (default 8)",
    )
    p.add_argument(
        "--draft",
        default=None,
        metavar="CKPT",
        help="a smaller checkpoint (or hub id) with the same tokenizer: speculative decoding (docs/serving.md)",
    )
    p.add_argument(
        "--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes a round (default 4)"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="cast the parameters (default: as stored)",
    )
    p.add_argument("--quantize", choices=["int8", "llm.int8"], default=None, help="int8 weights (docs/int8.md)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="a PEFT LoRA adapter directory, folded into the weights (docs/lora.md)",
    )
    p.add_argument("--served-model-name", default=None, help="the `model` clients name (default: the directory name)")
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a jinja chat template for /v1/chat/completions (default: the checkpoint's, if any)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may run on after SIGTERM before they are cancelled (default 30)",
    )
    p.add_argument(
        "--logprob-vocab",
        choices=["all", "tokenizer"],
        default="all",
        help="log-probabilities normalised over every output row (default: as lm-eval's hf backend, vLLM and "
        "`neox-jax evaluate`) or over the tokenizer's ids only (Pythia: 50277 of 50304 rows)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    distributed.add_arguments(p)
    compile_cache.add_argument(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import neox_jax
    from neox_jax.errors import NeoXError
    from neox_jax.parallel import distributed
    from neox_jax.store import compile_cache

    try:
        import uvicorn

        from neox_jax.serve.app import build_app
    except ImportError as e:
        raise NeoXError(f"serving needs the `serve` extra ({e}): pip install 'neox-jax[serve]'") from None
    from neox_jax.serve.logs import log_to_stderr
    from neox_jax.serve.service import Service
    from neox_jax.store.tokenizer import Tokenizer

    log_to_stderr(args.log_level)
    if args.num_processes not in (None, 1) or args.distributed:
        raise NeoXError("--num-processes / --distributed: the server runs in one process (use --mesh for its devices)")
    from neox_jax.store import hub

    if not Path(args.checkpoint).is_dir() and not hub.is_hub_id(args.checkpoint):
        raise NeoXError(f"--checkpoint {args.checkpoint}: no such directory (nor a hub id org/name)")
    compile_cache.enable(args.compile_cache)
    mesh = distributed.setup(args)
    try:
        lm = neox_jax.load(args.checkpoint, dtype=args.dtype, mesh=mesh, quantize=args.quantize, adapter=args.adapter)
        draft = None
        if args.draft is not None:
            if not Path(args.draft).is_dir() and not hub.is_hub_id(args.draft):
                raise NeoXError(f"--draft {args.draft}: no such directory (nor a hub id org/name)")
            draft = neox_jax.load(args.draft, dtype=args.dtype, mesh=mesh)
        tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else None
        template = Path(args.chat_template).read_text() if args.chat_template else None
        svc = Service.from_model(
            lm,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            max_model_len=args.max_model_len,
            chunk=args.chunk,
            name=args.served_model_name,
            tokenizer=tok,
            chat_template=template,
            logprob_vocab=args.logprob_vocab,
            draft=draft,
            draft_tokens=args.draft_tokens,
        )
    except (ValueError, FileNotFoundError) as e:
        raise NeoXError(str(e)) from None
    logging.getLogger("neox_jax.serve").info(
        "serving %s as %r on http://%s:%d (%d slots x %d positions)",
        lm,
        svc.name,
        args.host,
        args.port,
        svc.scheduler.engine.slots,
        svc.max_model_len,
    )
    if draft is not None:
        logging.getLogger("neox_jax.serve").info("draft %s proposing %d tokens a round", draft, args.draft_tokens)
    config = uvicorn.Config(
        build_app(svc, args.drain_timeout),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.drain_timeout,
    )
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that a clean exit 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if svc.scheduler.failed is not None:
        raise NeoXError(f"the model loop failed: {svc.scheduler.failed!r}")
    return 0
