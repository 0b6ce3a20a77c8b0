"""Decode that scales with the batch: tokens/s at batch 1, 2, 4, 8, 16, 32 per dtype (float32, bfloat16, int8
weight-only), against the roofline and transformers, in one run.

    neox-jax benchmark decode                       # pythia-70m shapes, random weights
    neox-jax benchmark decode --quick               # tiny preset, batches 1, 4, 16, 8 new tokens
    neox-jax benchmark decode --preset pythia-160m --dtypes float32,int8 --batches 1,16

Each row: `model.generate`'s decode loop (greedy, no stop ids, a 32-token prompt; compile excluded), its ms per step
and tokens/s, and the roofline: the bytes one step must read (every weight but the embedding table, which is only
gathered, plus the batch's K and V caches at the mean length) over the memory bandwidth measured in this run (a large
numpy copy). `step vs batch 1` is the batch-b step time over the batch-1 step: 1 means the batch came for free.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

from neox_jax.bench._common import markdown_table, reference_skipped, write_json
from neox_jax.bench.generate import bandwidth_gbs
from neox_jax.inference.cache import cache_bytes
from neox_jax.inference.generate import Generator
from neox_jax.model import quantize as Q
from neox_jax.model.config import preset
from neox_jax.model.neox import init_params

DTYPES = {"float32": (jnp.float32, None), "bfloat16": (jnp.bfloat16, None), "int8": (jnp.float32, "int8")}


def step_bytes(cfg, params, batch: int, length: int) -> int:
    """Bytes one decode step reads: the weights but the embedding table, and the K / V caches (float32 on CPU)."""
    embed = params["embed_in"]["embedding"]
    return Q.param_bytes(params) - embed.size * embed.dtype.itemsize + cache_bytes(cfg, batch, length)


def jax_row(cfg, params, batch: int, prompt: int, new: int, repeats: int) -> float:
    """ms per decode step at this batch (median of repeats, compile excluded)."""
    gen = Generator(cfg, params)
    ids = [list(np.random.RandomState(b).randint(0, cfg.vocab_size, prompt)) for b in range(batch)]

    def run():
        t = gen.generate(ids, max_new_tokens=new, stop_token_ids=[]).timing
        return t.decode_s / (t.decode_tokens / batch) * 1e3

    run()
    return float(np.median([run() for _ in range(repeats)]))


def torch_ms(cfg, batch: int, prompt: int, new: int) -> float:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg.to_hf_config())).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        pre = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return (time.perf_counter() - t - pre) / (new - 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pythia-70m")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny preset, batches 1,4,16, 8 new tokens, 1 repeat")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args()
    if a.quick:
        a.preset, a.batches, a.new, a.repeats = "tiny", "1,4,16", 8, 1
    cfg = preset(a.preset)
    batches = [int(b) for b in a.batches.split(",")]
    bw = bandwidth_gbs(256)
    torch_ok = not a.no_torch and not reference_skipped("the transformers rows")
    rows, base = [], init_params(cfg, jnp.float32)
    for name in a.dtypes.split(","):
        dtype, mode = DTYPES[name]
        params = Q.cast_floats(base, dtype)
        params = Q.quantize_tree(params, mode) if mode else params
        one = None
        for b in batches:
            ms = jax_row(cfg, params, b, a.prompt, a.new, a.repeats)
            one = one or ms
            roof = step_bytes(cfg, params, b, a.prompt + a.new // 2) / (bw * 1e9) * 1e3
            row = {"dtype": name, "batch": b, "step_ms": ms, "tokens/s": b / ms * 1e3, "step vs batch 1": ms / one}
            row |= {"roofline_ms": roof, "roofline_pct": 100 * roof / ms}
            if torch_ok and name == "float32":
                row["transformers tokens/s"] = b / torch_ms(cfg, b, a.prompt, a.new) * 1e3
            rows.append(row)
            print(" ", row, flush=True)
        del params
    cols = ["dtype", "batch", "step_ms", "tokens/s", "step vs batch 1", "roofline_ms", "roofline_pct"]
    print(f"\n{a.preset} (random weights), prompt {a.prompt}, {a.new} new tokens; bandwidth {bw:.1f} GB/s\n")
    print(markdown_table(rows, cols + (["transformers tokens/s"] if torch_ok else [])))
    print("wrote", write_json("decode", {"args": vars(a), "bandwidth_gbs": bw, "rows": rows}, a.out))


if __name__ == "__main__":
    main()
