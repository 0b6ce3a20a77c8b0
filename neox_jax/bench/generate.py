"""Generation speed: the PyTorch reference (transformers GPTNeoXForCausalLM) and neox-jax side by side, same random
weights, same thread count, in one run.

    neox-jax benchmark generate                  # pythia-70m and pythia-160m shapes, float32 and bfloat16
    neox-jax benchmark generate --quick          # a small check (pythia-70m float32, short runs, 1 repeat)
    neox-jax benchmark generate --models pythia-160m --dtypes float32 --only decode1   # while tuning

Each (engine, model, dtype) runs in its own subprocess (so peak RSS and the cold start are its own), engines one after
the other per model and dtype. Metrics: prefill tokens/s (1x512 and 8x128 prompts), decode ms/token at batch 1
(32-token prompt, 128 new tokens, greedy, no early stop), decode tokens/s at batch 8, time to first token cold (first
call in the process: compiles included) and warm (32-token prompt), peak RSS. The roofline: bytes of weights read per
decode step (every parameter but the embedding table, which is only gathered) / memory bandwidth measured in this run
(a large numpy copy, read + write bytes), the fastest batch-1 decode memory allows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neox_jax.bench._common import child_env, markdown_table, module_cmd, reference_skipped, write_json
from neox_jax.store import converters

METRICS = ("prefill", "decode1", "decode8", "ttft")


def random_weights(cfg, seed=0):
    """{hf_name: float32 numpy array in HF's layout}: normal(0, 0.02) weights, layernorm weights near 1."""
    group_entries = converters.module("mapping").group_entries

    rng = np.random.default_rng(seed)
    groups = ["embed_in", *[f"layers.{i}" for i in range(cfg.num_hidden_layers)], "final_layer_norm", "embed_out"]
    out = {}
    for g in groups:
        for e in group_entries(cfg, g):
            x = rng.standard_normal(e.hf_shape, np.float32) * 0.02
            out[e.hf_name] = (x + 1.0) if "layernorm" in e.hf_name and e.hf_name.endswith("weight") else x
    return out


def jax_params(cfg, weights, dtype):
    import jax.numpy as jnp

    mapping = converters.module("mapping")
    group_entries, set_path = mapping.group_entries, mapping.set_path

    params: dict = {}
    groups = ["embed_in", *[f"layers.{i}" for i in range(cfg.num_hidden_layers)], "final_layer_norm", "embed_out"]
    for g in groups:
        for e in group_entries(cfg, g):
            path = ("layers", int(g.split(".")[1]), *e.path) if g.startswith("layers.") else (g, *e.path)
            set_path(params, path, jnp.asarray(e.to_ours(weights.pop(e.hf_name)), dtype))
    return params


class JaxEngine:
    def __init__(self, cfg, weights, dtype):
        from neox_jax.inference.generate import Generator

        self.gen = Generator(cfg, jax_params(cfg, weights, dtype))

    def run(self, prompts, new):  # -> (prefill s, decode s for new-1 steps, first token s)
        t = self.gen.generate([list(p) for p in prompts], max_new_tokens=new, stop_token_ids=[]).timing
        return t.prefill_s, t.decode_s, t.first_token_s


class TorchEngine:
    def __init__(self, cfg, weights, dtype):
        import torch
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        self.torch = torch
        hf = GPTNeoXConfig(**{k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures",)})
        self.model = GPTNeoXForCausalLM(hf).eval()
        sd = {k: torch.from_numpy(v) for k, v in weights.items()}
        # transformers 5 names the output layer lm_head: without this it kept its own random init
        head = next(n for n, p in self.model.named_parameters() if p is self.model.get_output_embeddings().weight)
        sd[head] = sd.pop("embed_out.weight")
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            sys.exit(f"torch weights: missing {missing}, unexpected {unexpected}")
        weights.clear()
        self.model.to(getattr(torch, dtype))

    def run(self, prompts, new):
        torch = self.torch
        ids = torch.tensor(np.asarray(prompts))
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(ids, logits_to_keep=1)
            t1 = time.perf_counter()
            if new > 1:
                self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                )
            t2 = time.perf_counter()
        # generate = prefill + (new - 1) decode steps: its decode time is the total less the prefill just measured
        return t1 - t0, max(0.0, (t2 - t1) - (t1 - t0)), t1 - t0


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike getrusage's ru_maxrss it does not inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    from neox_jax.model.config import preset

    if args.engine == "neox-jax":
        from neox_jax.store import compile_cache

        compile_cache.enable()  # NEOX_JAX_COMPILE_CACHE from the parent: a fresh directory per run, or 0

    threads = args.threads
    if args.engine == "torch":
        import torch

        torch.set_num_threads(threads)
    cfg = preset(args.model)
    q = args.quick
    t = time.perf_counter()
    engine = (JaxEngine if args.engine == "neox-jax" else TorchEngine)(cfg, random_weights(cfg), args.dtype)
    out = {"setup_s": time.perf_counter() - t}
    rng = np.random.default_rng(1)
    ids = lambda b, n: rng.integers(0, 50000, (b, n)).tolist()  # noqa: E731
    med = lambda xs: statistics.median(xs)  # noqa: E731
    reps = args.repeats
    only = set(args.only)
    if "ttft" in only:
        p = ids(1, 32)
        if args.cached:  # only this: the rest of the row comes from the first worker
            return {"ttft_cold_cached_ms": engine.run(p, 1)[2] * 1e3}
        out["ttft_cold_ms"] = engine.run(p, 1)[2] * 1e3
        out["ttft_warm_ms"] = med([engine.run(p, 1)[2] for _ in range(reps)]) * 1e3
    new = 32 if q else 128
    if "decode1" in only:
        p = ids(1, 32)
        engine.run(p, new)  # warm-up: compiles
        out["decode1_ms_per_token"] = med([engine.run(p, new)[1] for _ in range(reps)]) / (new - 1) * 1e3
    if "decode8" in only:
        b = 4 if q else 8
        p = ids(b, 32)
        engine.run(p, new)
        out[f"decode{b}_tokens_per_s"] = b * (new - 1) / med([engine.run(p, new)[1] for _ in range(reps)])
    if "prefill" in only:
        for b, n in [(1, 128), (4, 32)] if q else [(1, 512), (8, 128)]:
            p = ids(b, n)
            engine.run(p, 1)
            out[f"prefill_{b}x{n}_tokens_per_s"] = b * n / med([engine.run(p, 1)[0] for _ in range(reps)])
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def bandwidth_gbs(mb: int = 1024, repeats: int = 5) -> float:
    """Memory bandwidth (GB/s) of a large numpy copy, read + write bytes, best of `repeats`."""
    a = np.ones(mb * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def weight_bytes_per_token(cfg, dtype: str) -> int:
    return (cfg.num_params - cfg.vocab_size * cfg.hidden_size) * (4 if dtype == "float32" else 2)


LOWER_IS_BETTER = ("_ms", "_mb", "_per_token")


def long_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, dtype, metric): torch, neox-jax and the speedup (>1: neox-jax better)."""
    out = []
    for r in rows:
        if r["engine"] != "neox-jax":
            continue
        ref = next(
            (x for x in rows if x["engine"] == "torch" and x["model"] == r["model"] and x["dtype"] == r["dtype"]), {}
        )
        for k, v in r.items():
            if k in ("model", "dtype", "engine", "setup_s") or not isinstance(v, (int, float)):
                continue
            row = {"model": r["model"], "dtype": r["dtype"], "metric": k, "torch": ref.get(k, ""), "neox-jax": v}
            if isinstance(ref.get(k), (int, float)) and ref[k] and v and not k.startswith("roofline"):
                row["speedup"] = ref[k] / v if k.endswith(LOWER_IS_BETTER) else v / ref[k]
            out.append(row)
    return out


def run_worker(cmd, env) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"{' '.join(cmd[3:7])} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="pythia-70m,pythia-160m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--engines", default="torch,neox-jax")
    ap.add_argument("--only", default=",".join(METRICS), help=f"comma list of {METRICS}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses every core)")
    ap.add_argument("--quick", action="store_true", help="pythia-70m float32, short runs, 1 repeat")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--worker", nargs=3, metavar=("ENGINE", "MODEL", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.only = args.only.split(",")
    if args.quick:
        args.models, args.dtypes, args.repeats = "pythia-70m", "float32", 1
    if args.worker:
        args.engine, args.model, args.dtype = args.worker
        print(json.dumps(worker(args)))
        return
    from neox_jax.model.config import preset

    bw = bandwidth_gbs(256 if args.quick else 1024)  # (the arrays are freed before the workers start)
    print(f"memory bandwidth (numpy copy): {bw:.1f} GB/s; threads {args.threads}", file=sys.stderr)
    engines = args.engines.split(",")
    if "torch" in engines and reference_skipped("the transformers engine"):
        engines.remove("torch")
    rows = []
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for engine in engines:
                cmd = module_cmd(
                    "generate",
                    "--worker",
                    engine,
                    model,
                    dtype,
                    "--repeats",
                    str(args.repeats),
                    "--threads",
                    str(args.threads),
                    "--only",
                    ",".join(args.only),
                    *(["--quick"] if args.quick else []),
                )
                with tempfile.TemporaryDirectory() as cache:  # JAX's persistent compilation cache, empty at first
                    env = child_env(OMP_NUM_THREADS=str(args.threads), NEOX_JAX_COMPILE_CACHE=cache)
                    row = {"model": model, "dtype": dtype, "engine": engine, **run_worker(cmd, env)}
                    if engine == "neox-jax" and "ttft" in args.only:  # a second process, the cache now filled
                        row.update(run_worker(cmd[: cmd.index("--only")] + ["--only", "ttft", "--cached"], env))
                if "decode1_ms_per_token" in row:
                    roof = weight_bytes_per_token(preset(model), dtype) / (bw * 1e9) * 1e3
                    row["roofline_ms"] = roof
                    row["roofline_pct"] = 100 * roof / row["decode1_ms_per_token"]
                rows.append(row)
                print(f"  {engine} {model} {dtype}: {row}", file=sys.stderr)
    table = markdown_table(long_rows(rows), ["model", "dtype", "metric", "torch", "neox-jax", "speedup"])
    print(table)
    path = write_json(
        "generate",
        {
            "bandwidth_gbs": bw,
            "threads": args.threads,
            "quick": args.quick,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "rows": rows,
            "table": table,
        },
        args.out,
    )
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
