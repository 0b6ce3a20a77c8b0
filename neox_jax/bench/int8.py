"""int8 inference: parameter bytes (int8 vs float16 vs float32) and decode ms/token, in one run.

    neox-jax benchmark int8 [--quick] [--preset pythia-160m] [--prompt 32] [--new 32]

Random weights of a preset's shape (timing and bytes do not depend on the values). Decode: neox_jax.inference.generate
(KV cache, compiled prefill + decode loop), greedy, batch 1: its decode time over the tokens after the first, after
a warm-up call (compile excluded). JAX rows: float32, float16, and int8 / llm.int8 block matrices with the other
params in float32 or float16.
PyTorch reference rows on the same config: transformers GPTNeoXForCausalLM float32 and its Linears through
torch.ao dynamic int8 (`quantize_dynamic`, per-tensor weights, per-token int8 activations; CPU only), decoding
with its KV cache. Also prints the GPT-NeoX-20B parameter bytes of each JAX variant from jax.eval_shape.
--quick: the tiny preset, 8 new tokens, 1 repeat, float32 and int8 + float32 only (checks that it runs).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.bench._common import markdown_table, peak_rss_mb, reference_skipped, write_json
from neox_jax.inference.generate import Generator
from neox_jax.model import quantize as Q
from neox_jax.model.config import preset
from neox_jax.model.neox import abstract_params, init_params

QUICK = ("float32", "int8 + float32")  # --quick: one float and one int8 variant
VARIANTS = [  # name, dtype of the float params, quantization mode
    ("float32", jnp.float32, None),
    ("float16", jnp.float16, None),
    ("int8 + float32", jnp.float32, "int8"),
    ("llm.int8 + float32", jnp.float32, "llm.int8"),
    ("int8 + float16", jnp.float16, "int8"),
    ("llm.int8 + float16", jnp.float16, "llm.int8"),
]


def jax_decode_ms(cfg, params, prompt, new: int, repeats: int) -> float:
    """ms per decoded token from neox_jax.inference.generate (greedy, no stop ids; compile excluded: warmed up
    first)."""
    gen = Generator(cfg, params)
    ids = [[int(t) for t in row] for row in np.asarray(prompt)]

    def run():
        t = gen.generate(ids, max_new_tokens=new, stop_token_ids=[]).timing
        return t.decode_s / t.decode_tokens * 1e3

    run()  # compile
    return float(np.median([run() for _ in range(repeats)]))


def torch_rows(cfg, prompt, new: int, repeats: int) -> list[dict]:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg.to_hf_config())).eval()
    ids = torch.tensor(np.asarray(prompt))

    def decode_ms(m):
        with torch.no_grad():
            out = m(ids, use_cache=True)
            key = "cache" if "cache" in out.keys() else "past_key_values"  # transformers 5 / 4 name of the KV cache
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(new):
                out = m(tok, use_cache=True, **{key: out[key]})
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - t0) / new * 1e3

    def nbytes(m):
        state = m.state_dict()
        total = 0
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(v, tuple):  # packed dynamic-quantized Linear: (int8 weight, bias)
                total += sum(t.numel() * t.element_size() for t in v if isinstance(t, torch.Tensor))
        return total

    rows = [
        {
            "impl": "torch",
            "variant": "float32",
            "param_MB": nbytes(model) / 1e6,
            "decode_ms_per_token": float(np.median([decode_ms(model) for _ in range(repeats + 1)][1:])),
        }
    ]
    try:
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            ms = float(np.median([decode_ms(qmodel) for _ in range(repeats + 1)][1:]))
        rows.append(
            {
                "impl": "torch",
                "variant": "dynamic int8 (torch.ao)",
                "param_MB": nbytes(qmodel) / 1e6,
                "decode_ms_per_token": ms,
            }
        )
    except Exception as e:  # torch.ao quantization is deprecated; report rather than fail
        rows.append({"impl": "torch", "variant": f"dynamic int8 unavailable: {type(e).__name__}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny preset, 8 new tokens, 1 repeat, 2 variants")
    ap.add_argument("--preset", default="pythia-160m", help="model shape (random weights); default pythia-160m")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new", type=int, default=32, help="decoded tokens timed (default 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference rows")
    ap.add_argument("--out", default="bench_out", help="directory for int8.json")
    a = ap.parse_args()
    if a.quick:
        a.preset, a.new, a.repeats = "tiny", 8, 1
    cfg = preset(a.preset)
    prompt = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, a.prompt)))
    big = preset("neox-20b")

    rows, base = [], init_params(cfg, jnp.float32)
    for name, dtype, mode in [v for v in VARIANTS if not a.quick or v[0] in QUICK]:
        params = Q.cast_floats(base, dtype)
        if mode is not None:
            params = Q.quantize_tree(params, mode)
        quant = Q.spec_of(params)
        rows.append(
            {
                "impl": "jax",
                "variant": name,
                "param_MB": Q.param_bytes(params) / 1e6,
                "neox20b_GB": Q.param_bytes(abstract_params(big, dtype, quant=quant)) / 1e9,
                "decode_ms_per_token": jax_decode_ms(cfg, params, prompt, a.new, a.repeats),
            }
        )
        print(f"  {name}: {rows[-1]['decode_ms_per_token']:.2f} ms/token", flush=True)
        del params
    if not a.no_torch and not reference_skipped("the PyTorch reference rows"):
        rows += torch_rows(cfg, prompt, a.new, a.repeats)

    cols = ["impl", "variant", "param_MB", "neox20b_GB", "decode_ms_per_token"]
    print(
        f"\n{a.preset}: batch 1, prompt {a.prompt}, {a.new} decoded tokens, {jax.devices()[0].platform}; "
        f"peak RSS {peak_rss_mb():.0f} MB"
    )
    print(markdown_table(rows, cols))
    path = write_json(
        "int8",
        {
            "preset": a.preset,
            "prompt": a.prompt,
            "new": a.new,
            "repeats": a.repeats,
            "device": str(jax.devices()[0]),
            "rows": rows,
        },
        a.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
