"""The machine's floors: the kernels that bound generation, fine-tuning and evaluation, XLA CPU vs torch.

    neox-jax benchmark kernels            # the shapes of pythia-160m
    neox-jax benchmark kernels --quick    # smaller arrays, fewer repeats: checks that it runs

Measured in one process, torch on --threads threads, XLA on every core:
- matmul: a [512, 768] x [768, 3072] product (pythia-160m's dense_h_to_4h over 512 tokens), float32 and bfloat16,
  GFLOP/s. Prefill, fine-tuning and scoring spend most of their time in products like it.
- stream: a chain of matrix-vector products over [3072, 768] float32 matrices larger together than the cache, GB/s
  of weights read: what batch-1 decode can reach. Also a plain sum over one large array (GB/s read).
- vocab exp-sum: sum(exp(x - 1)) over [512, 50304] rows, one pass and in chunks (neox_jax.model.reductions: 8 x 6,288).
- lambada floor (when ../shared/data or $NEOX_JAX_DATA_DIR holds the 20B tokenizer and LAMBADA): the matmul FLOPs
  of the eval benchmark's 200 lambada documents on pythia-160m, for neox-jax (output layer only where a token is
  scored) and for lm-eval's hf backend (output layer at every position), and the seconds they take at each
  framework's float32 matmul rate measured above: no backend can score them faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    import torch
except ImportError:  # main() says in one line that this benchmark needs it
    torch = None
from tokenizers import Tokenizer

from neox_jax.bench._common import markdown_table, require, write_json
from neox_jax.evaluation.tasks import data
from neox_jax.model.config import preset
from neox_jax.model.reductions import sum_exp


def best_and_median(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (compiles)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def stream_chain(count: int, reps: int, rng) -> tuple[float, float, float]:
    """(GB of weights, XLA s, torch s) of a chain of `count` [3072, 768] float32 matrix-vector products (median)."""
    mats = [rng.standard_normal((3072, 768), np.float32) * 0.02 for _ in range(count)]
    jmats, tmats = [jnp.asarray(a) for a in mats], [torch.from_numpy(a) for a in mats]

    @jax.jit
    def chain_xla(ws, v):  # v [1, 768]
        for w in ws:
            v = v + 1e-3 * (w @ v[0])[None, :768]
        return v

    def chain_torch(v):
        for w in tmats:
            v = v + 1e-3 * torch.nn.functional.linear(v, w)[:, :768]
        return v

    v0 = jnp.ones((1, 768), jnp.float32)
    with torch.inference_mode():
        t_torch = best_and_median(lambda: chain_torch(torch.ones(1, 768)), reps)[1]
    t_xla = best_and_median(lambda: chain_xla(jmats, v0).block_until_ready(), reps)[1]
    return sum(a.nbytes for a in mats) / 1e9, t_xla, t_torch


def stream_sum(n: int, reps: int) -> tuple[float, float, float]:
    """(GB, XLA s, torch s) of summing n float32 ones (best of reps)."""
    big = np.ones((n,), np.float32)
    jbig, tbig = jnp.asarray(big), torch.from_numpy(big)
    total = jax.jit(jnp.sum)
    t_torch = best_and_median(lambda: tbig.sum(), reps)[0]
    t_xla = best_and_median(lambda: total(jbig).block_until_ready(), reps)[0]
    return big.nbytes / 1e9, t_xla, t_torch


def lambada_floor(torch_gflops: float, xla_gflops: float, docs: int = 200) -> list[dict]:
    """Matmul GFLOP of scoring the first `docs` LAMBADA documents on pythia-160m (matmuls and attention scores; no
    layernorm, softmax or GELU), per backend, and its seconds at the two measured rates. [] without the data."""
    home = data.find("lambada_openai")
    tok_path = next((d / "20B_tokenizer.json" for d in data.data_dirs() if (d / "20B_tokenizer.json").is_file()), None)
    if home is None or tok_path is None:
        print("lambada floor skipped: no 20B_tokenizer.json / LAMBADA under", data.data_dirs(), file=sys.stderr)
        return []
    cfg = preset("pythia-160m")
    d, f, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    body = layers * (4 * d * d + 2 * d * f)  # qkv, dense, dense_h_to_4h, dense_4h_to_h: multiply-adds per token
    tok = Tokenizer.from_file(str(tok_path))
    fed = scored = attn = 0
    with open(home / data.FILES["lambada_openai"][0]) as fh:
        for line in list(fh)[:docs]:
            words = json.loads(line)["text"].split(" ")  # as the task: context = all but the last word
            c, w = len(tok.encode(" ".join(words[:-1])).ids), len(tok.encode(" " + words[-1]).ids)
            n = c + w - 1  # the last token is only a target
            fed, scored = fed + n, scored + w
            attn += layers * 2 * d * n * (n + 1) / 2  # QK^T and PV over the causal triangle
    out = []
    for name, head_rows in (("neox-jax", scored), ("hf", fed)):
        gflop = 2 * (body * fed + d * v * head_rows + attn) / 1e9
        out.append(
            {
                "backend": name,
                "input tokens": fed,
                "scored": scored,
                "GFLOP": gflop,
                "s at torch rate": gflop / torch_gflops,
                "s at xla rate": gflop / xla_gflops,
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core; default 2)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    require(["torch"], "it measures XLA's kernel rates against torch's")
    torch.set_num_threads(args.threads)
    reps = 2 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    rows: list[dict] = []

    def add(kernel, unit, xla_s, torch_s, amount):
        rows.append(
            {
                "kernel": kernel,
                "unit": unit,
                "torch": amount / torch_s,
                "xla": amount / xla_s,
                "xla / torch": torch_s / xla_s,
            }
        )

    m, k, n = (128, 256, 1024) if args.quick else (512, 768, 3072)
    x32, w32 = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)  # w: [out, in]
    for name, jdt, tdt in (("float32", jnp.float32, torch.float32), ("bfloat16", jnp.bfloat16, torch.bfloat16)):
        jx, jw = jnp.asarray(x32, jdt), jnp.asarray(w32, jdt)
        mm = jax.jit(lambda a, b: jnp.einsum("MI,OI->MO", a, b, preferred_element_type=jnp.float32))
        tx, tw = torch.from_numpy(x32).to(tdt), torch.from_numpy(w32).to(tdt)
        with torch.inference_mode():
            t_torch = best_and_median(lambda: torch.nn.functional.linear(tx, tw), reps)[1]
        t_xla = best_and_median(lambda: mm(jx, jw).block_until_ready(), reps)[1]
        add(f"matmul {m}x{k}x{n} {name}", "GFLOP/s", t_xla, t_torch, 2 * m * k * n / 1e9)

    count = 8 if args.quick else 60  # 60 x 9.4 MB: more than this machine's cache
    gb, t_xla, t_torch = stream_chain(count, reps, rng)
    add(f"stream: {count} matrix-vector products, {gb:.2f} GB float32", "GB/s", t_xla, t_torch, gb)
    gb, t_xla, t_torch = stream_sum(2**26 if args.quick else 2**28, reps)
    add(f"stream: sum of {gb:.2f} GB float32 (best)", "GB/s", t_xla, t_torch, gb)

    logits = jnp.asarray(rng.standard_normal((128 if args.quick else 512, 50304), np.float32))
    one = jnp.ones((logits.shape[0], 1), jnp.float32)
    plain = jax.jit(lambda a, b: jnp.exp(a - b).sum(-1))
    chunked = jax.jit(sum_exp)
    t_plain = best_and_median(lambda: plain(logits, one).block_until_ready(), reps)[1]
    t_chunk = best_and_median(lambda: chunked(logits, one).block_until_ready(), reps)[1]
    elems = logits.size / 1e9
    rows.append(
        {
            "kernel": f"vocab exp-sum {logits.shape[0]}x50304: one pass vs chunks",
            "unit": "Gelem/s",
            "xla": elems / t_chunk,
            "one pass": elems / t_plain,
        }
    )

    print(markdown_table(rows, ["kernel", "unit", "torch", "xla", "xla / torch", "one pass"]))
    floor = [] if args.quick else lambada_floor(rows[0]["torch"], rows[0]["xla"])  # quick rates mean nothing
    if floor:
        print(markdown_table(floor, ["backend", "input tokens", "scored", "GFLOP", "s at torch rate", "s at xla rate"]))
    path = write_json(
        "kernels", {"threads": args.threads, "quick": args.quick, "rows": rows, "lambada_floor": floor}, args.out
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
