"""One call that measures neox-jax on whatever accelerator JAX sees (made for a lent GPU and a few minutes):

    neox-jax benchmark gpu                # float16: pythia-1.4b, neox-20b, pythia-6.9b, pythia-12b
    neox-jax benchmark gpu --budget-s 300 --models neox-20b --out /tmp/gpu
    neox-jax benchmark gpu --tiny         # CPU, tiny shapes, seconds: what the tests run

First it prints jax.devices() and the versions, then measures the device's copy bandwidth (a jitted, donated
x * 2 over 2 GiB, read + write bytes). Per model, in order, while it fits in memory (device.memory_stats()) and in
the budget: random weights made on the device (a jitted init with out_shardings: no host copy, no download); batch-1
and batch-16 greedy decode through neox_jax.inference.generate (32-token prompts) against the bandwidth roofline
(weights read
per step, the embedding table excepted, plus the KV cache, over the measured bandwidth); the prefill of a 2047-token
prompt (the 2048 bucket) with the fused attention (cuDNN on GPU, XLA's dot_product_attention elsewhere) and the plain
one; peak device memory (the process's, and the largest compiled program's own); then, when torch sees a GPU (or with
--tiny, on CPU), transformers' GPTNeoXForCausalLM on the same shape and dtype, randomly initialised on the device.
A stage that would not fit in the time left is skipped (the guess: the stage's time on the previous model, scaled by
depth; 20 s before the first), one that fails is recorded, and both say so. JSON + Markdown go to --out after every
stage, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

# before JAX starts its backend: allocate as needed (transformers shares the device later in this process)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95")


from neox_jax.bench import _gpu_torch as gpu_torch
from neox_jax.bench._common import markdown_table, write_json

MODELS = "pythia-1.4b,neox-20b,pythia-6.9b,pythia-12b"
GIB = 2**30


class Budget:
    """Seconds left, and a guess of what a stage needs: its time on the previous model scaled by depth."""

    def __init__(self, seconds: float, default_s: float):
        self.end, self.default_s, self.seen = time.perf_counter() + seconds, default_s, {}

    def left(self) -> float:
        return self.end - time.perf_counter()

    def need(self, stage: str, layers: int) -> float:
        prev = self.seen.get(stage)
        return self.default_s if prev is None else prev[0] * max(1.0, layers / prev[1])

    def run(self, stage: str, layers: int, fn, skipped: dict):
        need = self.need(stage, layers)
        if self.left() < need:
            skipped[stage] = f"skipped: needs ~{need:.0f} s, {max(0.0, self.left()):.0f} s of the budget left"
            print(f"    {stage}: {skipped[stage]}", flush=True)
            return None
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 -- one call on a lent GPU: record what broke (cuDNN refusing a shape,
            # an allocation failing) and measure the rest
            skipped[stage] = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            print(f"    {stage}: {skipped[stage]}", flush=True)
            return None
        self.seen[stage] = (time.perf_counter() - t, layers)
        return out


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in (
        "jax",
        "jaxlib",
        "jax-cuda12-plugin",
        "jax-cuda12-pjrt",
        "jax-cuda13-plugin",
        "jax-cuda13-pjrt",
        "flax",
        "orbax-checkpoint",
        "torch",
        "transformers",
        "nvidia-cudnn-cu12",
        "nvidia-cudnn-cu13",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def bandwidth_gbs(device, mib: int) -> float:
    """Read + write bytes of a jitted elementwise x * 2 over `mib` MiB of float32, best of 5, per second."""
    import jax
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones(mib * 2**20 // 4, jnp.float32), device)
    nbytes = x.nbytes
    f = jax.jit(lambda a: a * 2, donate_argnums=0)  # donated: the output reuses the input's buffer, no fresh pages
    x = f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x = f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    del x
    return 2 * nbytes / best / 1e9


def free_bytes(device) -> int:
    """What the device can still allocate; on CPU (no memory_stats) the host's available memory."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_params(cfg, dtype, device):
    """Random params (normal 0.02, layernorms 1) made on the device by one jitted init: nothing on the host."""
    import jax

    from neox_jax.model.neox import init_params

    init = jax.jit(lambda: init_params(cfg, dtype, seed=0), out_shardings=jax.sharding.SingleDeviceSharding(device))
    params = init()
    jax.block_until_ready(params)
    return params


def program_peak_gib(gen) -> float:
    """The largest compiled program's own memory (arguments + outputs + temporaries - donated aliases)."""
    best = 0
    for compiled in gen.programs.values():
        m = compiled.memory_analysis()
        if m is not None:
            best = max(
                best, m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
            )
    return best / GIB


def jax_stages(cfg, dtype: str, device, args, bw: float, budget: Budget, row: dict, save) -> None:
    import numpy as np

    from neox_jax.inference import decode
    from neox_jax.inference.cache import cache_bytes
    from neox_jax.inference.generate import SLOT_ROUND, Generator
    from neox_jax.model import attention

    layers, itemsize = cfg.num_hidden_layers, np.dtype(dtype).itemsize
    params = budget.run("init", layers, lambda: device_params(cfg, dtype, device), row["skipped"])
    if params is None:
        return
    backend = device.platform
    base = decode.layout_for(params, "cpu" if backend == "cpu" else backend)
    gen = Generator(cfg, params, layout=base._replace(attention="plain"))  # decode: its prefill's attention is
    # not timed, and plain compiles everywhere
    rng = np.random.default_rng(0)
    weights = (cfg.num_params - cfg.vocab_size * cfg.hidden_size) * itemsize  # read every step (not the embedding)
    new, p = args.new_tokens, 32
    slots = -(-(p + new) // SLOT_ROUND) * SLOT_ROUND

    def decode_stage(b):
        prompts = rng.integers(0, cfg.vocab_size, (b, p)).tolist()
        gen.generate(prompts, max_new_tokens=new, stop_token_ids=[])  # compiles
        s = min(
            gen.generate(prompts, max_new_tokens=new, stop_token_ids=[]).timing.decode_s for _ in range(args.repeats)
        )
        step_ms = s / (new - 1) * 1e3
        roof_ms = (weights + cache_bytes(cfg, b, slots, dtype)) / (bw * 1e9) * 1e3
        row[f"decode{b}_ms_per_step"], row[f"decode{b}_tokens_per_s"] = step_ms, b * 1e3 / step_ms
        row[f"decode{b}_roofline_ms"], row[f"decode{b}_roofline_pct"] = roof_ms, 100 * roof_ms / step_ms
        print(
            f"    decode batch {b}: {step_ms:.2f} ms/step ({b * 1e3 / step_ms:.0f} tokens/s), roofline "
            f"{roof_ms:.2f} ms ({100 * roof_ms / step_ms:.0f}%)",
            flush=True,
        )

    for b in (1, 16):
        budget.run(f"decode{b}", layers, lambda b=b: decode_stage(b), row["skipped"])
        save()
    n = args.prefill_len - 1
    fused = "cudnn" if backend == "gpu" and attention.cudnn_supports(dtype, cfg.head_dim) else "xla"
    row["fused_attention"] = fused

    def prefill_stage(impl):
        g = Generator(cfg, params, layout=base._replace(attention=impl))
        prompt = rng.integers(0, cfg.vocab_size, (1, n)).tolist()
        g.generate(prompt, max_new_tokens=1, stop_token_ids=[])  # compiles
        s = min(g.generate(prompt, max_new_tokens=1, stop_token_ids=[]).timing.prefill_s for _ in range(args.repeats))
        row[f"prefill_{impl}_tokens_per_s"] = n / s
        row["program_peak_gib"] = max(row.get("program_peak_gib", 0.0), program_peak_gib(g))
        print(f"    prefill {n} tokens, {impl} attention: {n / s:.0f} tokens/s", flush=True)

    for impl in (fused, "plain"):
        budget.run(f"prefill_{impl}", layers, lambda impl=impl: prefill_stage(impl), row["skipped"])
        save()
    row["program_peak_gib"] = max(row.get("program_peak_gib", 0.0), program_peak_gib(gen))
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["process_peak_gib"] = stats["peak_bytes_in_use"] / GIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS, help=f"comma list of presets, in order (default {MODELS})")
    ap.add_argument("--dtype", default=None, help="float16 (default) or bfloat16; --tiny: bfloat16")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole run (default 480)")
    ap.add_argument("--prefill-len", type=int, default=2048, help="prefill bucket (prompt = this - 1 tokens)")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per run, plus one (default 64)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per measurement, best taken (default 2)")
    ap.add_argument("--no-torch", action="store_true", help="skip transformers")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU in seconds (what the tests run)")
    ap.add_argument("--out", default="bench_out/gpu", help="directory for gpu.json and gpu.md")
    args = ap.parse_args()
    import jax

    if args.tiny:  # (jax may be imported already, by the neox-jax command: its backend starts at the first use)
        jax.config.update("jax_platforms", "cpu")
        args.models, args.prefill_len, args.new_tokens, args.repeats = "tiny", 128, 8, 1
    dtype = args.dtype or ("bfloat16" if args.tiny else "float16")

    from neox_jax.model.config import preset

    t0 = time.perf_counter()
    device = jax.devices()[0]
    header = {
        "devices": [str(d) for d in jax.devices()],
        "device_kind": device.device_kind,
        "platform": device.platform,
        "versions": versions(),
        "dtype": dtype,
        "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "budget_s": args.budget_s,
    }
    print(f"jax.devices(): {jax.devices()}\nversions: {header['versions']}", flush=True)
    torch_device = None if args.no_torch else gpu_torch.device(allow_cpu=args.tiny)
    header["torch_device"] = torch_device or "none (torch with CUDA not importable, or --no-torch)"
    print(f"transformers reference on: {header['torch_device']}", flush=True)
    bw = bandwidth_gbs(device, 64 if args.tiny else 2048)
    header["bandwidth_gbs"] = bw
    print(f"copy bandwidth: {bw:.0f} GB/s", flush=True)
    budget = Budget(args.budget_s - (time.perf_counter() - t0), 0.0 if args.tiny else 20.0)
    rows: list[dict] = []

    def save():
        table = markdown_table(long_rows(rows), ["model", "metric", "neox-jax", "transformers", "roofline"])
        write_json("gpu", {**header, "rows": rows, "table": table}, args.out)
        (Path(args.out) / "gpu.md").write_text(
            f"{header['device_kind']} ({header['platform']}), {dtype}, copy "
            f"bandwidth {bw:.0f} GB/s, {header['date']}\n\n{table}\n"
        )

    for name in args.models.split(","):
        cfg = preset(name)
        row = {"model": name, "params_b": cfg.num_params / 1e9, "skipped": {}}
        rows.append(row)
        weights = cfg.num_params * (2 if dtype != "float32" else 4)
        free = free_bytes(device)
        print(f"{name}: {cfg.num_params / 1e9:.2f}B params, {weights / GIB:.1f} GiB", flush=True)
        if weights * 1.15 + 2 * GIB > free:
            row["skipped"]["all"] = f"does not fit: {weights / GIB:.1f} GiB of weights, {free / GIB:.1f} GiB free"
            print(f"    {row['skipped']['all']}", flush=True)
            save()
            continue
        jax_stages(cfg, dtype, device, args, bw, budget, row, save)
        gc.collect()  # the params and programs of this model, before transformers' copy
        if torch_device is not None:
            budget.run(
                "transformers",
                cfg.num_hidden_layers,
                lambda row=row, cfg=cfg: row.update(gpu_torch.measure(cfg, dtype, torch_device, args)),
                row["skipped"],
            )
        save()
    save()
    print(markdown_table(long_rows(rows), ["model", "metric", "neox-jax", "transformers", "roofline"]))
    print(f"wrote {Path(args.out) / 'gpu.json'} and gpu.md ({time.perf_counter() - t0:.0f} s)", flush=True)


# neox-jax metric -> transformers' (its prefill runs its own fused attention, SDPA: beside ours)
METRICS = {
    "decode1_ms_per_step": "torch_decode1_ms_per_step",
    "decode16_ms_per_step": "torch_decode16_ms_per_step",
    "decode16_tokens_per_s": "torch_decode16_tokens_per_s",
    "prefill_fused_tokens_per_s": "torch_prefill_tokens_per_s",
    "prefill_plain_tokens_per_s": None,
    "program_peak_gib": None,
    "process_peak_gib": "torch_peak_gib",
}


def long_rows(rows: list[dict]) -> list[dict]:
    """One Markdown row per (model, metric): neox-jax, transformers, and the roofline where one exists."""
    out = []
    for r in rows:
        fused = r.get("fused_attention", "fused")
        for m, ref in METRICS.items():
            key = m.replace("fused", fused)
            if key not in r and ref not in r:
                continue
            roof = ""
            if m.endswith("ms_per_step") and m.replace("ms_per_step", "roofline_ms") in r:
                roof = (
                    f"{r[m.replace('ms_per_step', 'roofline_ms')]:.3g} ms "
                    f"({r[m.replace('ms_per_step', 'roofline_pct')]:.0f}% reached)"
                )
            out.append(
                {
                    "model": r["model"],
                    "metric": m.replace("fused", f"fused ({fused})"),
                    "neox-jax": r.get(key, ""),
                    "transformers": r.get(ref, ""),
                    "roofline": roof,
                }
            )
        for stage, why in r["skipped"].items():
            out.append({"model": r["model"], "metric": stage, "neox-jax": why})
        if "torch_skipped" in r:
            out.append({"model": r["model"], "metric": "transformers", "transformers": r["torch_skipped"]})
    return out


if __name__ == "__main__":
    main()
