"""Memorization scoring speed: transformers' greedy generate (as EleutherAI's eval_memorization.py calls it) and
neox-jax's `memorization` study side by side, same random weights, same batch, same machine, one run.

    neox-jax benchmark memorization                       # pythia-70m shapes, batch 64, 32 + 32 tokens
    neox-jax benchmark memorization --model pythia-160m --batch 32 --repeats 5
    neox-jax benchmark memorization --threads 1           # one thread for each engine

Each call scores one batch: `batch` contexts of `context` tokens, `continuation` greedy tokens each, the end-of-text
id kept out (transformers: min_length = max_length = context + continuation; neox-jax: suppress_token_ids), then
the fraction equal to the true tokens. Reported: sequences/s of each (the median of `repeats` timed calls, alternating
between the two, after one warm-up call each; neox-jax's compile is in its warm-up, reported apart), their ratio, and
how many of neox-jax's tokens equal transformers' (the true tokens here are transformers' own greedy output).

The floor, measured in the same run: the batch's matrix multiplies, shape by shape (the prompt's forward on
batch x context rows through every layer and the output layer at each row's last position; then continuation - 1
decode steps of `batch` rows through every layer and the 50304-wide output layer), each timed on its own in XLA (both
weight layouts) and in torch, the fastest kernel kept, timed again between the engines' calls (the median counts);
attention's products counted at the best rate seen. Their sum is the time of a batch if everything but the matrix
multiplies were free and each ran at the best kernel this machine has: no engine's exact greedy decoding can beat it
by much, so a goal above it is out of this machine's reach.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from neox_jax.bench._common import markdown_table, reference_skipped, write_json
from neox_jax.bench._floor import MatmulFloor, attention_gflop, batch_matmuls
from neox_jax.bench.generate import TorchEngine, jax_params, random_weights
from neox_jax.model.config import PRESETS, preset


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
    ap.add_argument(
        "--model", default="pythia-70m", choices=list(PRESETS), help="a neox-jax preset's shapes (random weights)"
    )
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
    if a.threads == 1:  # before JAX's backend starts (it reads XLA_FLAGS then): matmuls on the calling thread only
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"

    from neox_jax.inference.generate import Generator
    from neox_jax.sweep.memorization import greedy_scores

    cfg = preset(a.model)
    k, n, b = a.context, a.continuation, a.batch
    contexts = np.random.default_rng(1).integers(0, min(50000, cfg.vocab_size), (b, k))
    gen = Generator(cfg, jax_params(cfg, random_weights(cfg), "float32"))
    eos = (cfg.eos_token_id,)
    fns, torch = {}, None
    if not reference_skipped("the transformers arm"):
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
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

        fns["hf"] = hf_call
        truth = hf_call()  # the true tokens: transformers' own greedy output
    else:
        truth = np.random.default_rng(2).integers(0, min(50000, cfg.vocab_size), (b, n))
    fns["nx"] = lambda: greedy_scores(gen, contexts, truth, eos)
    floor = MatmulFloor(batch_matmuls(cfg, b, k, n), torch)
    floor.pick()
    fns["floor"] = floor
    res = interleaved(fns, a.repeats)
    nx_first, nx_s, scores = res["nx"]
    rows = [{"engine": "neox-jax memorization", "seq/s": b / nx_s, "s/batch": nx_s, "first call s": nx_first}]
    payload = {
        "model": a.model,
        "batch": b,
        "context": k,
        "continuation": n,
        "threads": a.threads,
        "neox_jax_seq_per_s": b / nx_s,
        "neox_jax_first_call_s": nx_first,
    }
    if "hf" in res:
        hf_first, hf_s, _ = res["hf"]
        agree = float(np.mean(scores))
        hf_row = {"engine": "transformers generate", "seq/s": b / hf_s, "s/batch": hf_s, "first call s": hf_first}
        rows.insert(0, hf_row)
        payload |= {
            "torch_threads": torch.get_num_threads(),
            "transformers_seq_per_s": b / hf_s,
            "ratio": hf_s / nx_s,
            "token_agreement": agree,
        }
    rate, products = floor.rate(), floor.rows()
    floor_s = statistics.median(floor.estimates[1:]) + attention_gflop(cfg, b, k, n) / rate
    rows.append(
        {
            "engine": "floor: the batch's matmuls at this machine's best kernels",
            "seq/s": b / floor_s,
            "s/batch": floor_s,
        }
    )
    payload |= {"floor_seq_per_s": b / floor_s, "floor_s": floor_s, "best_matmul_gflops": rate, "products": products}
    print(markdown_table(rows, ["engine", "seq/s", "s/batch", "first call s"]))
    print()
    print(markdown_table(products, ["product", "count", "best kernel", "ms", "GFLOP/s", "ms in the batch"]))
    print(
        f"\nneox-jax runs at {floor_s / nx_s:.0%} of the floor's speed ({b / floor_s:.1f} seq/s; best matmul "
        f"{rate:.0f} GFLOP/s)"
    )
    if "hf" in res:
        goal = 3 * b / hf_s
        payload["goal_3x_seq_per_s"] = goal
        print(
            f"neox-jax / transformers = {payload['ratio']:.2f}x  ({a.model} shapes, float32, batch {b}, {k} + {n} "
            f"tokens; neox-jax tokens equal to transformers': {agree:.4f}; compiles: {gen.compiles})\n"
            f"floor / transformers = {hf_s / floor_s:.2f}x: 3x transformers ({goal:.1f} seq/s) is "
            + ("above this machine's floor" if goal > b / floor_s else "within this machine's floor")
        )
    write_json("memorization", payload, a.out)


if __name__ == "__main__":
    main()
