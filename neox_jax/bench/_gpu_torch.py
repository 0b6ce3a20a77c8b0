"""The transformers side of `benchmark.py gpu`: GPTNeoXForCausalLM randomly initialised on the device, same shape and
dtype, timed like neox-jax (32-token prompts, greedy, no early stop; the prefill of a 2047-token prompt)."""

from __future__ import annotations

import gc
import time

GIB = 2**30


def device(allow_cpu: bool) -> str | None:
    """ "cuda" when torch sees a GPU; "cpu" when allowed (--tiny); else None (no reference)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if allow_cpu else None


def measure(cfg, dtype: str, dev: str, args) -> dict:
    """{"torch_decode1_ms_per_step", "torch_decode16_ms_per_step", "torch_decode16_tokens_per_s",
    "torch_prefill_tokens_per_s", "torch_peak_gib"} (or "torch_skipped" with the reason); the model is freed after."""
    import torch

    out = _measure(cfg, dtype, dev, args)
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()  # give the device back for JAX's next model
    print(f"    transformers: {out}", flush=True)
    return out


def _measure(cfg, dtype: str, dev: str, args) -> dict:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tdtype = getattr(torch, dtype)
    need = cfg.num_params * tdtype.itemsize
    if dev == "cuda":
        free = torch.cuda.mem_get_info()[0]
        if need * 1.15 + 2 * GIB > free:
            return {"torch_skipped": f"does not fit: {need / GIB:.1f} GiB of weights, {free / GIB:.1f} GiB free"}
        torch.cuda.reset_peak_memory_stats()
    hf = GPTNeoXConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "architectures"})
    default = torch.get_default_dtype()
    try:  # made on the device in the run's dtype: no float32 copy, nothing on the host
        torch.set_default_dtype(tdtype)
        with torch.device(dev):
            model = GPTNeoXForCausalLM(hf).eval()
    finally:
        torch.set_default_dtype(default)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    gen = torch.Generator().manual_seed(0)
    out, new = {}, args.new_tokens
    with torch.inference_mode():
        for b in (1, 16):
            ids = torch.randint(0, cfg.vocab_size, (b, 32), generator=gen).to(dev)
            pre = timed(lambda ids=ids: model(ids, logits_to_keep=1))
            total = timed(
                lambda ids=ids: model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                )
            )
            step_ms = max(0.0, total - pre) / (new - 1) * 1e3  # generate = prefill + (new - 1) decode steps
            out[f"torch_decode{b}_ms_per_step"] = step_ms
            if b > 1 and step_ms:
                out[f"torch_decode{b}_tokens_per_s"] = b * 1e3 / step_ms
        ids = torch.randint(0, cfg.vocab_size, (1, args.prefill_len - 1), generator=gen).to(dev)
        out["torch_prefill_tokens_per_s"] = ids.shape[1] / timed(lambda: model(ids, logits_to_keep=1))
    if dev == "cuda":
        out["torch_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return out
