"""Generate text from a neox-jax checkpoint.

    neox-jax generate --checkpoint ckpt/pythia-160m                       # the default prompt, greedy
    neox-jax generate --checkpoint ckpt/pythia-160m --prompt "Hello" --temperature 0.8 --top-p 0.95 --stream
    neox-jax generate --checkpoint ckpt/pythia-160m --prompt-file prompts.txt --json > out.json

    neox-jax generate --checkpoint ckpt/pythia-1.4b --draft ckpt/pythia-160m --draft-tokens 4  # speculative

    neox-jax generate --checkpoint ckpt/neox-20b --dtype fp16 --mesh model=8  # tensor parallel, 8 GPUs
    # two hosts, 8 GPUs each: run on both, --process-id 0 on the first (whose address is the coordinator)
    neox-jax generate --checkpoint ckpt/neox-20b --mesh data=2,model=8 \\
        --coordinator host0:1234 --num-processes 2 --process-id 0

Prompts run as one batch (left-padded); with --stream each prompt streams in turn. On several processes every process
runs the same prompts and only process 0 prints. --json prints one JSON object
(prompts, completions, token ids, finish reasons, timing) on stdout; streamed text then goes to stderr.
JAX's persistent compilation cache is on (see neox_jax/store/compile_cache.py), so a second run skips the compiles.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from neox_jax.errors import NeoXError

HELP = "generate text from a checkpoint (greedy or sampled, streamed, batched, sharded over a mesh)"
DEFAULT_PROMPT = "Einstein was born in the German Empire, but moved to Switzerland in 1895, forsaking his German"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from neox_jax.parallel import distributed
    from neox_jax.store import compile_cache
    from neox_jax.store.checkpoint import DTYPE_CHOICES

    p.add_argument("--checkpoint", required=True, help="neox-jax checkpoint directory (neox-jax convert ...)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); default: the Einstein sentence")
    p.add_argument("--prompt-file", type=Path, help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument(
        "--tokenizer", default=None, metavar="FILE", help="tokenizer.json to use (default: the checkpoint's)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable); not part of the output")
    p.add_argument(
        "--stop-token-id",
        type=int,
        action="append",
        default=None,
        help="a stop token id (repeatable; default: the tokenizer's end-of-text)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text (only --stop-token-id ids)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast the parameters (default: as stored)")
    p.add_argument(
        "--finetuned",
        default=None,
        metavar="RUN_DIR",
        help="apply the trained parameters of a fine-tuning run (neox-jax finetune --out)",
    )
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), folded into "
        "the weights (docs/lora.md)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "llm.int8"],
        default=None,
        help="int8 weights: weight-only, or LLM.int8 with outlier features in float (docs/int8.md)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=1,
        help="decode steps per streamed piece (default 1: each token as it is made; more is faster on CPU)",
    )
    p.add_argument(
        "--draft",
        default=None,
        metavar="CKPT",
        help="speculative decoding: a smaller checkpoint with the same tokenizer proposes tokens the target checks "
        "(the target's output distribution; greedy: its very tokens). Loaded with --dtype and --mesh",
    )
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes a step (4)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are made")
    p.add_argument("--json", action="store_true", help="print one JSON object with everything")
    compile_cache.add_argument(p)
    distributed.add_arguments(p)  # --mesh, --coordinator, --num-processes, --process-id, --distributed


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        if not args.prompt_file.is_file():
            raise NeoXError(f"--prompt-file {args.prompt_file}: no such file")
        try:
            lines = [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise NeoXError(f"--prompt-file {args.prompt_file}: cannot read it as text ({e})") from None
        if not lines:  # never fall back to the default prompt when the user named a file
            raise NeoXError(f"--prompt-file {args.prompt_file}: holds no prompt (expected one prompt per line)")
        prompts += lines
    return prompts or [DEFAULT_PROMPT]


def _run_prompts(gen, prompts, kw, stream: bool, chunk: int, out) -> list:
    if not stream:
        return [gen.generate(prompts, **kw)]
    results = []
    for prompt in prompts:
        print(prompt, end="", file=out, flush=True)
        s = gen.stream([prompt], chunk_size=chunk, **kw)
        for event in s:
            print(event.texts[0], end="", file=out, flush=True)
        print(file=out)
        results.append(s.result)
    return results


def _speculative(results) -> dict:
    """The acceptance statistics summed over the calls (one per prompt when streaming)."""
    keys = ("proposed", "accepted", "target_steps")
    out = {k: sum(r.speculative[k] for r in results) for k in keys}
    decoded = sum(r.timing.decode_tokens for r in results)
    return {
        "draft_tokens": results[0].speculative["draft_tokens"],
        **out,
        "acceptance_rate": out["accepted"] / out["proposed"] if out["proposed"] else 0.0,
        "tokens_per_target_step": decoded / out["target_steps"] if out["target_steps"] else 0.0,
    }


def run(args: argparse.Namespace) -> int:
    from neox_jax.parallel import distributed
    from neox_jax.store import compile_cache

    try:
        mesh = distributed.setup(args)  # first: jax.distributed.initialize must run before any device is touched
    except ValueError as e:
        raise NeoXError(str(e)) from e
    compile_cache.enable(args.compile_cache)
    import neox_jax
    from neox_jax.inference.sampling import SamplingParams

    talk = distributed.is_main()  # only process 0 prints
    prompts = _prompts(args)
    # the sampling settings are checked before the model loads (NeoXError naming the setting)
    SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    try:  # a ValueError here is e.g. a model that cannot split over the mesh: the message says which sizes work
        model = neox_jax.load(
            args.checkpoint,
            dtype=args.dtype,
            mesh=mesh,
            finetuned=args.finetuned,
            adapter=args.adapter,
            quantize=args.quantize,
            tokenizer=args.tokenizer,
        )
    except ValueError as e:
        raise NeoXError(str(e)) from e
    if model.tokenizer is None:
        raise NeoXError(
            f"{args.checkpoint}: no tokenizer.json; text prompts need one (pass --tokenizer FILE, or "
            f"convert from a folder that has it)"
        )
    gen = model.generator()
    if args.draft is not None:
        from neox_jax.inference.speculative_driver import SpeculativeGenerator

        try:
            draft = neox_jax.load(args.draft, dtype=args.dtype, mesh=mesh)
        except ValueError as e:
            raise NeoXError(f"--draft {args.draft}: {e}") from e
        gen = SpeculativeGenerator(gen, draft.generator(), args.draft_tokens)
    stop_ids = [] if args.ignore_eos else None
    if args.stop_token_id:
        stop_ids = list(args.stop_token_id) + ([] if args.ignore_eos else [model.tokenizer.eos_id])
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        stop_token_ids=stop_ids,
    )
    out = (sys.stderr if args.json else sys.stdout) if talk else io.StringIO()
    try:
        results = _run_prompts(gen, prompts, kw, args.stream, args.chunk_size, out)
    except ValueError as e:
        raise NeoXError(str(e)) from e
    completions, timings = [], []
    i = 0
    for r in results:
        for j in range(len(r.token_ids)):
            completions.append(
                {
                    "prompt": prompts[i],
                    "prompt_tokens": len(r.prompt_ids[j]),
                    "text": r.texts[j],
                    "token_ids": r.token_ids[j],
                    "finish_reason": r.finish_reasons[j],
                    "stopped_by": r.stopped_by[j],
                }
            )
            i += 1
        timings.append(r.timing.to_dict())
    timing = {k: sum(t[k] for t in timings) for k in timings[0]}
    timing["decode_tokens_per_s"] = timing["decode_tokens"] / timing["decode_s"] if timing["decode_s"] else 0.0
    if not talk:
        return 0
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(args.checkpoint),
                    "dtype": str(model.dtype),
                    "sampling": {k: v for k, v in kw.items() if k != "max_new_tokens"},
                    "max_new_tokens": args.max_new_tokens,
                    "completions": completions,
                    "timing": timing,
                    **({"speculative": _speculative(results)} if args.draft else {}),
                },
                indent=2,
                ensure_ascii=False,
            )
        )
    elif not args.stream:
        for c in completions:
            print(f"{c['prompt']}\x1b[1m{c['text']}\x1b[0m" if sys.stdout.isatty() else c["prompt"] + c["text"])
            print(f"  [{c['finish_reason']}, {len(c['token_ids'])} tokens]")
    print(
        f"compile {timing['compile_s']:.2f} s, prefill {timing['prefill_s'] * 1e3:.1f} ms, "
        f"first token {timing['first_token_s'] * 1e3:.1f} ms, decode {timing['decode_tokens_per_s']:.1f} tokens/s "
        f"({model!r})",
        file=sys.stderr,
    )
    if args.draft:
        st = _speculative(results)
        print(
            f"draft {args.draft}: k {st['draft_tokens']}, acceptance {st['acceptance_rate']:.2f}, "
            f"{st['tokens_per_target_step']:.2f} tokens per target step",
            file=sys.stderr,
        )
    return 0
