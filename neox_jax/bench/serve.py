"""Serving throughput: the neox-jax server (continuous batching) at 1, 4 and 16 concurrent clients, against the same
requests one at a time, `model.generate` at batch 1 and transformers `generate` on the same requests batched
statically, in one run.

    neox-jax benchmark serve                     # pythia-70m shapes, random weights, 32 requests x 32 tokens
    neox-jax benchmark serve --model pythia-160m --requests 64

Every request is greedy with ignore_eos, so each makes exactly --max-tokens tokens on every engine. Clients are the
official `openai` client over 127.0.0.1 (threads); the server is `neox-jax serve` in a process of its own, as deployed
(`--server thread`: uvicorn in a thread of this process, where the clients' threads and the server share one
interpreter lock). 16 clients run 16 requests at once until the --requests are done (--requests >= 32: each client
sends two or more, so the figure is a steady 16 at a time, not one burst). Throughput:
generated tokens / wall time of the whole set; latency: per request, send to last token (p50 / p99). The transformers
rows run the requests in static batches of --max-batch (left-padded; a request's latency is its batch's).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(ckpt: Path, args, max_len: int):
    """`neox-jax serve` on 127.0.0.1 in a child process; yields its URL once /health answers 200 (at most 15 min,
    the compile included); stopped with SIGTERM (then killed) on the way out."""
    port = free_port()
    cmd = [sys.executable, "-m", "neox_jax", "serve", "--checkpoint", str(ckpt), "--port", str(port)]
    cmd += ["--max-batch", str(args.max_batch), "--max-model-len", str(max_len), "--chunk", str(args.chunk)]
    cmd += ["--max-queue", str(max(64, args.requests)), "--log-level", "warning", "--no-compile-cache"]
    proc = subprocess.Popen(cmd, env=child_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"neox-jax serve exited with {proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("neox-jax serve was not ready within 15 minutes")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def floor_rows(lm, args, total: int) -> list[dict]:
    """The same requests' matrix multiplies as the server runs them (its weights, its decode form, every Linear of a
    step chained in one program: bench/decode.py's floor), one at a time and 16 at a time (a wave's prompts prefilled
    together, then every step on 16 rows): the rate the server's kernels allow here, all else free."""
    from neox_jax.bench.decode import matmul_floor_ms, run_linears
    from neox_jax.inference.generate import Generator

    linears = run_linears(Generator(lm.config, lm.params))
    body = [lin for lin in linears if lin[0].shape[0] != lm.config.vocab_size]
    unembed = [lin for lin in linears if lin[0].shape[0] == lm.config.vocab_size]

    def ms(lins, rows):
        return matmul_floor_ms(lins, rows, None, 7)

    p, n, b, reqs = args.prompt_tokens, args.max_tokens, args.max_batch, args.requests
    waves = -(-reqs // b)  # groups of b requests
    plans = {  # label -> (clients, seconds: prompts' forwards (the output layer at the last position) + steps)
        "floor: one at a time, the server's matmuls alone": (
            1,
            reqs * (ms(body, p) + ms(unembed, 1) + (n - 1) * ms(linears, 1)) / 1e3,
        ),
        f"floor: {b} at a time, the server's matmuls alone": (
            b,
            waves * (ms(body, b * p) + ms(unembed, b) + (n - 1) * ms(linears, b)) / 1e3,
        ),
    }
    out = [{"engine": k, "clients": c, "tokens/s": total / s, "wall s": s} for k, (c, s) in plans.items()]
    for row in out:
        print(row, file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pythia-70m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument(
        "--server",
        choices=("process", "thread"),
        default="process",
        help="the server in a process of its own (default, as deployed) or in a thread of this one",
    )
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
        t = time.perf_counter()
        rows = []
        total = args.requests * args.max_tokens
        with contextlib.ExitStack() as stack:
            if args.server == "process":
                url, name = stack.enter_context(server_process(ckpt, args, max_len)), ckpt.name
            else:
                svc = Service.from_model(
                    lm,
                    max_batch=args.max_batch,
                    max_queue=max(64, args.requests),
                    chunk=args.chunk,
                    max_model_len=max_len,
                )
                url, name = stack.enter_context(ServerThread(svc)).url, svc.name
            print(f"server up in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            run_clients(url, name, reqs[:2], args.max_tokens, 2)  # a first request through every layer
            for c in (1, 4, 16):
                lat, wall = run_clients(url, name, reqs, args.max_tokens, c)
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
        rows += floor_rows(lm, args, total)
    base = rows[0]["tokens/s"]
    gen = next(r["tokens/s"] for r in rows if r["engine"].startswith("model.generate"))
    for r in rows:
        r["vs one at a time"] = r["tokens/s"] / base
        r["vs model.generate"] = r["tokens/s"] / gen
    print(
        f"\n{args.model} (random weights), {args.requests} requests x {args.prompt_tokens} prompt + "
        f"{args.max_tokens} generated tokens, greedy, {args.max_batch} slots, the server in a {args.server}, "
        f"{os.cpu_count()} CPUs\n"
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
