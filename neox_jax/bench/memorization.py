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


def batch_matmuls(cfg, b: int, k: int, n: int) -> list[tuple[int, int, int, int]]:
    """(rows, in, out, count) of every dense product one scored batch runs: the prompt's forward over b x k rows
    (the output layer at the last position only), then n - 1 decode steps of b rows (the n-th token needs no step)."""
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    body = [(3 * d, d), (d, d), (f, d), (d, f)]  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h: (out, in)
    out = [(b * k, i, o, layers) for o, i in body] + [(b, d, v, 1)]
    out += [(b, i, o, layers * (n - 1)) for o, i in body] + [(b, d, v, n - 1)]
    return out


def attention_gflop(cfg, b: int, k: int, n: int) -> float:
    """GFLOP of attention's two products (scores and values) in the prompt's forward and the n - 1 decode steps."""
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    prompt = b * k * (k + 1) / 2  # causal: query t attends over t + 1 keys
    steps = b * sum(k + i + 1 for i in range(n - 1))  # step i's query attends over k + i + 1 keys
    return 2 * 2 * layers * d * (prompt + steps) / 1e9


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of fn, s: a floor takes the best a kernel did, not its typical time."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class MatmulFloor:
    """The batch's dense products, each as its own call in XLA with the weight as [in, out] and as [out, in], and in
    torch's F.linear when torch is given. pick() keeps the fastest kernel of each shape; each call of the object
    then times every product once more (the best of 3) and returns the batch's floor in s, so that, called between
    the engines' timed calls, a change in the machine's load falls on the floor too."""

    def __init__(self, products, torch=None):
        import jax
        import jax.numpy as jnp

        rng = np.random.default_rng(0)
        kernels = {
            "xla [in, out]": jax.jit(lambda x, w: x @ w),
            "xla [out, in]": jax.jit(lambda x, w: jnp.einsum("MI,OI->MO", x, w)),
        }
        self.products, self.calls, self.estimates = products, [], []
        for m, i, o, _ in products:
            x = rng.standard_normal((m, i), np.float32)
            w = rng.standard_normal((o, i), np.float32) * 0.02  # [out, in]
            jx, jw, jwt = jnp.asarray(x), jnp.asarray(w), jnp.asarray(w.T.copy())
            calls = {
                "xla [in, out]": lambda f=kernels["xla [in, out]"], a=jx, c=jwt: f(a, c).block_until_ready(),
                "xla [out, in]": lambda f=kernels["xla [out, in]"], a=jx, c=jw: f(a, c).block_until_ready(),
            }
            if torch is not None:
                tx, tw = torch.from_numpy(x), torch.from_numpy(w)

                def linear(a=tx, c=tw):
                    with torch.inference_mode():
                        torch.nn.functional.linear(a, c)

                calls["torch"] = linear
            self.calls.append(calls)

    def pick(self, repeats: int = 5) -> None:
        """Keep each shape's fastest kernel (after a call that compiles)."""
        for k, calls in enumerate(self.calls):
            for fn in calls.values():
                fn()
            times = {name: best_time(fn, repeats) for name, fn in calls.items()}
            name = min(times, key=times.get)
            self.calls[k] = {name: calls[name]}

    def __call__(self) -> float:
        self.times = [best_time(next(iter(c.values())), 3) for c in self.calls]
        self.estimates.append(sum(p[3] * t for p, t in zip(self.products, self.times)))
        return self.estimates[-1]

    def rate(self) -> float:
        """The best GFLOP/s any product reached in the last call."""
        return max(2 * m * i * o / 1e9 / t for (m, i, o, _), t in zip(self.products, self.times))

    def rows(self) -> list[dict]:
        out = []
        for (m, i, o, count), calls, t in zip(self.products, self.calls, self.times):
            out.append(
                {
                    "product": f"[{m}, {i}] x [{i}, {o}]",
                    "count": count,
                    "best kernel": next(iter(calls)),
                    "ms": t * 1e3,
                    "GFLOP/s": 2 * m * i * o / 1e9 / t,
                    "ms in the batch": count * t * 1e3,
                }
            )
        return out


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
