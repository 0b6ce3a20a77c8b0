"""Memorization scoring speed: transformers' greedy generate (as EleutherAI's eval_memorization.py calls it) and
neox-jax's `memorization` study side by side, same random weights, same batch, same machine, one run.

    python scripts/benchmark.py memorization                       # pythia-70m shapes, batch 64, 32 + 32 tokens
    python scripts/benchmark.py memorization --model pythia-160m --batch 32 --repeats 5

Each call scores one batch: `batch` contexts of `context` tokens, `continuation` greedy tokens each, the end-of-text
id kept out (transformers: min_length = max_length = context + continuation; neox-jax: suppress_token_ids), then
the fraction equal to the true tokens. Reported: sequences/s of each (the median of `repeats` timed calls, alternating
between the two, after one warm-up call each; neox-jax's compile is in its warm-up, reported apart), their ratio, and
how many of neox-jax's tokens equal transformers' (the true tokens here are transformers' own greedy output).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# the repo root first, and not this folder (its convert.py would shadow the `convert` package)
sys.path[:] = [str(ROOT)] + [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]

from scripts.bench._common import markdown_table, write_json  # noqa: E402
from scripts.bench.generate import TorchEngine, jax_params, random_weights  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict:
    """name -> (first call s, median of `repeats` further calls s, the last result). The timed calls alternate
    between the engines, so a change in the machine's load falls on both."""
    first, times, last = {}, {k: [] for k in fns}, {}
    for name, fn in fns.items():  # warm-up: neox-jax compiles here
        t = time.perf_counter()
        last[name] = fn()
        first[name] = time.perf_counter() - t
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {k: (first[k], statistics.median(times[k]), last[k]) for k in fns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pythia-70m", help="a neox-jax preset's shapes (random weights)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--continuation", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for both engines (torch.set_num_threads; XLA: one thread when 1). Default: each its own",
    )
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args()
    if a.threads == 1:  # before jax starts: XLA CPU's matmuls on the calling thread only
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"

    import torch

    from neox_jax.inference.generate import Generator
    from neox_jax.model.config import preset
    from neox_jax.sweep.memorization import greedy_scores

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = preset(a.model)
    k, n, b = a.context, a.continuation, a.batch
    contexts = np.random.default_rng(1).integers(0, 50000, (b, k))
    hf = TorchEngine(cfg, random_weights(cfg), "float32").model
    ids = torch.tensor(contexts)

    def hf_call():
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_length=k + n,
                min_length=k + n,
                pad_token_id=0,
            )
        return out[:, k:].numpy()  # scoring against the truth is the same numpy line in both arms: left out

    gen = Generator(cfg, jax_params(cfg, random_weights(cfg), "float32"))
    eos = (cfg.eos_token_id,)
    truth = hf_call()  # the true tokens: transformers' own greedy output
    res = interleaved({"hf": hf_call, "nx": lambda: greedy_scores(gen, contexts, truth, eos)}, a.repeats)
    (hf_first, hf_s, _), (nx_first, nx_s, scores) = res["hf"], res["nx"]
    agree = float(np.mean(scores))
    rows = [
        {"engine": "transformers generate", "seq/s": b / hf_s, "s/batch": hf_s, "first call s": hf_first},
        {"engine": "neox-jax memorization", "seq/s": b / nx_s, "s/batch": nx_s, "first call s": nx_first},
    ]
    print(markdown_table(rows, ["engine", "seq/s", "s/batch", "first call s"]))
    print(
        f"\nneox-jax / transformers = {hf_s / nx_s:.2f}x  ({a.model} shapes, float32, batch {b}, {k} + {n} tokens; "
        f"neox-jax tokens equal to transformers': {agree:.4f}; compiles: {gen.compiles})"
    )
    write_json(
        "memorization",
        {
            "model": a.model,
            "batch": b,
            "context": k,
            "continuation": n,
            "threads": a.threads,
            "torch_threads": torch.get_num_threads(),
            "transformers_seq_per_s": b / hf_s,
            "neox_jax_seq_per_s": b / nx_s,
            "ratio": hf_s / nx_s,
            "neox_jax_first_call_s": nx_first,
            "token_agreement": agree,
        },
        a.out,
    )


if __name__ == "__main__":
    main()
