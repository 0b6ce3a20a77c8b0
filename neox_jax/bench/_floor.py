"""The matmul floor of a workload: its dense products, shape by shape, each timed alone at the fastest kernel this
machine has (XLA with the weight as [in, out] or [out, in], or torch's F.linear); their sum is the workload's time if
nothing but its matrix multiplies cost anything. Benchmarks print it beside the engines, measured in the same run,
so a goal beyond what the machine's arithmetic allows shows as such."""

from __future__ import annotations

import numpy as np

from neox_jax.bench._common import best_time


def step_matmuls(cfg, rows: int, count: int = 1) -> list[tuple[int, int, int, int]]:
    """(rows, in, out, count) of the dense products of `count` forwards of `rows` rows through every layer and the
    output layer at every row (a decode step: rows = the batch)."""
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    body = [(3 * d, d), (d, d), (f, d), (d, f)]  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h: (out, in)
    return [(rows, i, o, layers * count) for o, i in body] + [(rows, d, v, count)]


def prompt_matmuls(cfg, b: int, k: int) -> list[tuple[int, int, int, int]]:
    """The prompt's forward of b prompts of k tokens: b x k rows through every layer, the output layer at each
    prompt's last position only."""
    body = step_matmuls(cfg, b * k)[:-1]
    return body + [(b, cfg.hidden_size, cfg.vocab_size, 1)]


def batch_matmuls(cfg, b: int, k: int, n: int) -> list[tuple[int, int, int, int]]:
    """(rows, in, out, count) of every dense product of greedy decoding b prompts of k tokens for n tokens: the
    prompt's forward, then n - 1 decode steps of b rows (the n-th token needs no step)."""
    return prompt_matmuls(cfg, b, k) + (step_matmuls(cfg, b, n - 1) if n > 1 else [])


def attention_gflop(cfg, b: int, k: int, n: int) -> float:
    """GFLOP of attention's two products (scores and values) in the prompt's forward and the n - 1 decode steps."""
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    prompt = b * k * (k + 1) / 2  # causal: query t attends over t + 1 keys
    steps = b * sum(k + i + 1 for i in range(n - 1))  # step i's query attends over k + i + 1 keys
    return 2 * 2 * layers * d * (prompt + steps) / 1e9


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
