"""Interpretability: run_with_cache over a batch vs transformers with output_hidden_states + output_attentions.

    neox-jax benchmark interp [--quick] [--preset pythia-70m] [--batch 8] [--length 128]

One random transformers GPTNeoXForCausalLM of a preset's shape (eager attention, the implementation that returns
attention weights), converted in-process to neox-jax (convert/hf.py), so both sides hold the same weights. Rows, each
the median of --repeats calls after a warm-up (neox-jax's compile is reported on its own):
  jax   run_with_cache, every hook name (16-17 per layer)
  jax   run_with_cache, the names transformers returns: blocks.*.hook_resid_pre + hook_pattern + ln_final
  jax   plain forward (NeoX.logits), for the cost of the cache
  torch forward with output_hidden_states + output_attentions (eager), and without them (default attention)
The cached activations are copied to host memory in the timed call on both sides (numpy), and checked against each
other (max |diff| of hidden states and attention patterns). TransformerLens is not installed in this environment
(it pins its own torch / transformers): no row for it.
--quick: the tiny preset, batch 2, length 16, 1 repeat.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import neox_jax
from neox_jax.bench._common import markdown_table, median_time, peak_rss_mb, require, write_json
from neox_jax.model.config import preset
from neox_jax.store import converters


def hf_model(cfg, attn: str):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg.to_hf_config())).eval()
    model.set_attn_implementation(attn)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny preset, batch 2, length 16, 1 repeat")
    ap.add_argument("--preset", default="pythia-70m", help="model shape (random weights); default pythia-70m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_out", help="directory for interp.json")
    a = ap.parse_args()
    require(["torch", "transformers"], "the model is built in transformers and compared with it")
    if a.quick:
        a.preset, a.batch, a.length, a.repeats = "tiny", 2, 16, 1
    import torch

    convert_hf = converters.module("hf").convert_hf

    cfg = preset(a.preset)
    hf = hf_model(cfg, "eager")
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf")
        convert_hf(Path(tmp) / "hf", Path(tmp) / "ckpt", progress=False)
        model = neox_jax.load(Path(tmp) / "ckpt")
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (a.batch, a.length))
    n = cfg.num_hidden_layers
    hf_names = [f"blocks.{i}.{s}" for i in range(n) for s in ("hook_resid_pre", "attn.hook_pattern")]
    hf_names.append("unembed.hook_in")  # the last hidden state

    def jax_cache(names):
        logits, cache = model.run_with_cache(ids, names)
        return np.asarray(logits), {k: np.asarray(v) for k, v in cache.items()}

    rows = []
    for what, names in (("run_with_cache, every name", None), ("run_with_cache, transformers' names", hf_names)):
        t0 = time.perf_counter()
        _, cache = jax_cache(names)
        first = time.perf_counter() - t0
        ms = median_time(lambda names=names: jax_cache(names), a.repeats) * 1e3
        rows.append(
            {
                "impl": "neox-jax",
                "what": what,
                "names": len(cache),
                "first_call_s": first,
                "ms": ms,
                "cache_MB": sum(v.nbytes for v in cache.values()) / 1e6,
            }
        )
        print(f"  {what}: {ms:.1f} ms", flush=True)
    model.logits(ids)
    rows.append(
        {"impl": "neox-jax", "what": "forward only", "ms": median_time(lambda: model.logits(ids), a.repeats) * 1e3}
    )
    tids = torch.tensor(ids)

    def hf_cache(m):
        with torch.no_grad():
            out = m(tids, output_hidden_states=True, output_attentions=True)
        return [h.numpy() for h in out.hidden_states], [p.numpy() for p in out.attentions]

    hs, att = hf_cache(hf)
    ms = median_time(lambda: hf_cache(hf), a.repeats) * 1e3
    rows.append(
        {
            "impl": "transformers",
            "what": "output_hidden_states + output_attentions (eager)",
            "names": len(hs) + len(att),
            "ms": ms,
            "cache_MB": sum(x.nbytes for x in hs + att) / 1e6,
        }
    )
    fast = hf_model(cfg, "sdpa")
    fast.load_state_dict(hf.state_dict())
    with torch.no_grad():
        rows.append(
            {
                "impl": "transformers",
                "what": "forward only (sdpa)",
                "ms": median_time(lambda: fast(tids).logits.numpy(), a.repeats) * 1e3,
            }
        )
    rows.append({"impl": "TransformerLens", "what": "not installed in this environment (not measured)"})
    diff_h = max(np.abs(cache[f"blocks.{i}.hook_resid_pre"] - hs[i]).max() for i in range(n))
    diff_h = max(diff_h, np.abs(cache["unembed.hook_in"] - hs[n]).max())
    diff_p = max(np.abs(cache[f"blocks.{i}.attn.hook_pattern"] - att[i]).max() for i in range(n))

    cols = ["impl", "what", "names", "first_call_s", "ms", "cache_MB"]
    print(
        f"\n{a.preset}: batch {a.batch} x {a.length} tokens, float32, {jax.devices()[0].platform}, "
        f"torch threads {torch.get_num_threads()}; peak RSS {peak_rss_mb():.0f} MB"
    )
    print(markdown_table(rows, cols))
    print(f"max |diff| vs transformers: hidden states {diff_h:.2e}, attention patterns {diff_p:.2e}")
    path = write_json(
        "interp",
        {
            "preset": a.preset,
            "batch": a.batch,
            "length": a.length,
            "repeats": a.repeats,
            "device": str(jax.devices()[0]),
            "rows": rows,
            "max_diff": {"hidden_states": float(diff_h), "attentions": float(diff_p)},
        },
        a.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
