"""Serving throughput: the neox-jax server (continuous batching) at 1, 4 and 16 concurrent clients, against the same
requests one at a time, `model.generate` at batch 1 and transformers `generate` on the same requests batched
statically, in one run.

    neox-jax benchmark serve                     # pythia-70m shapes, random weights, 32 requests x 32 tokens
    neox-jax benchmark serve --model pythia-160m --requests 64

Every request is greedy with ignore_eos, so each makes exactly --max-tokens tokens on every engine. Clients are the
official `openai` client over 127.0.0.1 (threads); the server runs in this process (uvicorn in a thread). Throughput:
generated tokens / wall time of the whole set; latency: per request, send to last token (p50 / p99). The transformers
rows run the requests in static batches of --max-batch (left-padded; a request's latency is its batch's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from neox_jax.bench._common import child_env, markdown_table, require, write_json
from neox_jax.evaluation.tasks import data

NEEDS = ("20B_tokenizer.json", "tinyshakespeare/input.txt")


def data_dir() -> Path | None:
    """The first data directory ($NEOX_JAX_DATA_DIR, else ../shared/data beside a checkout) holding NEEDS."""
    return next((d for d in data.data_dirs() if all((d / f).is_file() for f in NEEDS)), None)


def make_checkpoint(model: str, out: Path, DATA: Path):
    """A random-weight HF GPT-NeoX of the preset's shapes with the 20B tokenizer, converted by `convert hf`."""
    import subprocess

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neox_jax.model.config import PRESETS

    c = PRESETS[model]
    hf_cfg = GPTNeoXConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        rotary_pct=c.rotary_pct,
        max_position_embeddings=c.max_position_embeddings,
        use_parallel_residual=c.use_parallel_residual,
        hidden_act=c.hidden_act,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(hf_cfg).eval()
    src = out / "hf"
    hf.save_pretrained(src)
    (src / "tokenizer.json").write_bytes((DATA / "20B_tokenizer.json").read_bytes())
    subprocess.run(
        [sys.executable, "-m", "neox_jax", "convert", "hf", str(src), str(out / "ckpt"), "--quiet"],
        check=True,
        env=child_env(),
    )
    return hf, out / "ckpt"


def prompts(n: int, tokens: int, tok, DATA: Path) -> list[list[int]]:
    """n different prompts of `tokens` ids each, from tinyshakespeare."""
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    ids = tok.encode(text)
    return [ids[i * 97 : i * 97 + tokens] for i in range(n)]


def stats(name, lat, wall, tokens) -> dict:
    lat = sorted(lat)
    return {
        "engine": name,
        "tokens/s": tokens / wall,
        "p50 latency s": statistics.median(lat),
        "p99 latency s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
        "wall s": wall,
    }


def run_clients(url, name, reqs, max_tokens, concurrency):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(p):
        t = time.perf_counter()
        r = client.completions.create(
            model=name, prompt=p, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.usage.completion_tokens == max_tokens, r.usage
        return time.perf_counter() - t

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(one, reqs))
    return lat, time.perf_counter() - t


def run_transformers(hf, reqs, max_tokens, batch):
    import torch

    lat, t0 = [], time.perf_counter()
    for i in range(0, len(reqs), batch):
        group = reqs[i : i + batch]
        width = max(map(len, group))
        ids = torch.tensor([[1] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=1,
            )
        assert out.shape[1] == width + max_tokens
        lat += [time.perf_counter() - t0] * len(group)  # every request of a batch was sent at the start
    return lat, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pythia-70m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    require(["torch", "transformers", "openai"], "the model is built in transformers; the clients are openai's")
    DATA = data_dir()
    if DATA is None:
        sys.exit(f"reference data absent: {' and '.join(NEEDS)} under none of {data.data_dirs()} (${data.ENV_VAR})")
    import torch

    import neox_jax
    from neox_jax.serve import ServerThread, Service

    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        hf, ckpt = make_checkpoint(args.model, Path(tmp), DATA)
        lm = neox_jax.load(ckpt)
        reqs = prompts(args.requests, args.prompt_tokens, lm.tokenizer, DATA)
        max_len = args.prompt_tokens + args.max_tokens
        svc = Service.from_model(
            lm, max_batch=args.max_batch, max_queue=max(64, args.requests), chunk=args.chunk, max_model_len=max_len
        )
        t = time.perf_counter()
        rows = []
        total = args.requests * args.max_tokens
        with ServerThread(svc) as srv:
            print(
                f"server up in {time.perf_counter() - t:.1f} s ({svc.scheduler.engine.compiles} programs)",
                file=sys.stderr,
            )
            run_clients(srv.url, svc.name, reqs[:2], args.max_tokens, 2)  # a first request through every layer
            for c in (1, 4, 16):
                lat, wall = run_clients(srv.url, svc.name, reqs, args.max_tokens, c)
                label = "neox-jax serve, one at a time" if c == 1 else f"neox-jax serve, {c} concurrent"
                rows.append({**stats(label, lat, wall, total), "clients": c})
                print(rows[-1], file=sys.stderr)
        lm.generate(reqs[0], max_new_tokens=args.max_tokens, stop_token_ids=[])  # compile
        t, lat = time.perf_counter(), []
        for p in reqs:  # the library's own single-stream rate, the server's yardstick
            lm.generate(p, max_new_tokens=args.max_tokens, stop_token_ids=[])
            lat.append(time.perf_counter() - t)
        rows.append(
            {**stats("model.generate, batch 1, one at a time", lat, time.perf_counter() - t, total), "clients": 1}
        )
        run_transformers(hf, reqs[:2], 2, 2)  # warm-up
        lat, wall = run_transformers(hf, reqs, args.max_tokens, args.max_batch)
        rows.append(
            {
                **stats(f"transformers generate, static batches of {args.max_batch}", lat, wall, total),
                "clients": args.max_batch,
            }
        )
    base = rows[0]["tokens/s"]
    gen = next(r["tokens/s"] for r in rows if r["engine"].startswith("model.generate"))
    for r in rows:
        r["vs one at a time"] = r["tokens/s"] / base
        r["vs model.generate"] = r["tokens/s"] / gen
    print(
        f"\n{args.model} (random weights), {args.requests} requests x {args.prompt_tokens} prompt + "
        f"{args.max_tokens} generated tokens, greedy, {args.max_batch} slots, {os.cpu_count()} CPUs\n"
    )
    print(
        markdown_table(
            rows,
            [
                "engine",
                "clients",
                "tokens/s",
                "vs one at a time",
                "vs model.generate",
                "p50 latency s",
                "p99 latency s",
            ],
        )
    )
    print("wrote", write_json("serve", {"args": vars(args), "rows": rows}, args.out))


if __name__ == "__main__":
    main()
