"""Fine-tuning speed and memory: neox-jax's jitted train step vs a PyTorch train step of transformers'
GPTNeoXForCausalLM with the same shape, batch, sequence length, dtype and optimizer (AdamW, clip 1.0), training the
biases (BitFit: query_key_value, attention.dense, dense_h_to_4h), every parameter, or LoRA adapters (torch side:
peft.get_peft_model with the same r, alpha and target modules).

    neox-jax benchmark finetune                 # pythia-70m and pythia-160m shapes, random weights
    neox-jax benchmark finetune --quick         # the tiny test shape, 1 timed step: checks that it runs
    neox-jax benchmark finetune --trainable lora --lora-rank 8 --lora-targets query_key_value

Each measurement runs in its own subprocess so that its peak RSS is its own: `peak_rss_mb` is the process's peak,
`train_mb` the peak minus the RSS once the model was built (what training adds: gradients, optimizer state,
activations; for JAX also the compiler's own memory). tokens/s = batch * seq_len / median step time, after
untimed warm-up steps (the first compiles).

The matmul floor: `gflop` counts the step's linear-layer matmuls (forward; the input gradients, which layer 0's
query_key_value and dense_h_to_4h do not need; with `all` the weight gradients too; LoRA's rank-r products left out;
attention scores left out, ~1% at
128 tokens), and each worker times its own framework's [batch*seq, hidden] x [hidden, 4*hidden] float32/bf16 matmul
in the same process: `floor_ms` = gflop / that rate, the step time if everything but the matmuls were free.
`of_floor` = floor_ms / step_ms says how much of the step the matmuls are. (XLA's cost analysis of the
JAX step, which also counts attention and elementwise work, comes to 3% more than `gflop` for pythia-70m and -160m.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from neox_jax.bench._common import (
    child_env,
    markdown_table,
    median_time,
    module_cmd,
    peak_rss_mb,
    reference_skipped,
    run_json,
    write_json,
)

BIAS_SUFFIXES = ("attention.query_key_value.bias", "attention.dense.bias", "mlp.dense_h_to_4h.bias")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _windows(vocab, batch, seq, seed=0):
    import numpy as np

    return np.random.RandomState(seed).randint(0, vocab, (batch, seq + 1)).astype(np.int32)


def step_gflop(cfg, mode: str, tokens: int) -> float:
    """Matmul GFLOP of one training step (see the module docstring)."""
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    per_layer = 4 * d * d + 2 * d * f  # query_key_value (3 d^2), dense (d^2), dense_h_to_4h and dense_4h_to_h
    forward = layers * per_layer + d * v  # multiply-adds per token
    input_grads = forward - (3 * d * d + d * f)  # layer 0's inputs come from the frozen embedding
    weight_grads = forward if mode == "all" else 0
    return 2 * tokens * (forward + input_grads + weight_grads) / 1e9


def matmul_gflops(mm, m: int, k: int, n: int) -> float:
    """mm() runs one [m, k] x [k, n] product; its median rate in GFLOP/s after a warm-up call (the compile)."""
    mm()
    return 2 * m * k * n / 1e9 / median_time(mm, repeats=7)


def lora_spec(args):
    from neox_jax.model.lora import LoraSpec

    return LoraSpec(args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")))


def worker_jax(shape, mode, batch, seq, dtype_name, steps, warmup, args) -> dict:
    import jax
    import jax.numpy as jnp

    from neox_jax.model import lora
    from neox_jax.model.config import preset
    from neox_jax.model.neox import init_params
    from neox_jax.parallel.sharding import make_mesh
    from neox_jax.training import step as ft

    cfg, dtype = preset(shape), jnp.dtype(dtype_name)
    mode = lora_spec(args) if mode == "lora" else mode
    mesh = make_mesh("data=1,model=1", jax.devices()[:1])
    trainable, frozen = ft.split_params(init_params(cfg, dtype), mode)
    frozen = ft.prepare_frozen(cfg, frozen, dtype, mesh, mode)
    trainable = lora.init_adapters(cfg, mode) if lora.is_lora(mode) else ft.cast(trainable, jnp.float32)
    base = _rss_mb()
    tx = ft.make_optimizer(ft.make_schedule(3e-4, 100), 1.0)
    state = ft.init_state(trainable, tx, ft.state_shardings(cfg, mesh, mode, tx), dynamic=dtype == jnp.float16)
    del trainable  # donated
    step = ft.make_train_step(cfg, tx, dtype, mesh, mode, dynamic=dtype == jnp.float16)
    times = []
    for i in range(steps + warmup):
        w = _windows(cfg.vocab_size, batch, seq, i)
        t = time.perf_counter()
        state, m = step(state, frozen, w)
        float(m["loss"])
        times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    x, w = jnp.ones((batch * seq, cfg.hidden_size), dtype), jnp.ones((cfg.hidden_size, cfg.intermediate_size), dtype)
    product = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))

    def mm():
        product(x, w).block_until_ready()

    return {
        "times": times[warmup:],
        "compile_s": times[0],
        "base_mb": base,
        "loss": float(m["loss"]),
        "matmul_gflops": matmul_gflops(mm, *x.shape, w.shape[1]),
        "device_peak_mb": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
        "trainable": sum(x.size for x in jax.tree.leaves(state["params"])),
    }


def worker_torch(shape, mode, batch, seq, dtype_name, steps, warmup, args) -> dict:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from neox_jax.model.config import preset

    cfg = preset(shape)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg.to_hf_config())).to(getattr(torch, dtype_name)).train()
    if mode == "lora":  # float32 adapters on the frozen base (PEFT's default autocast_adapter_dtype)
        import peft

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=args.lora_targets.split(",")),
        )
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = []
        for name, p in model.named_parameters():
            p.requires_grad_(mode == "all" or name.endswith(BIAS_SUFFIXES))
            if p.requires_grad:
                params.append(p)
    base = _rss_mb()
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    times = []
    for i in range(steps + warmup):
        w = torch.from_numpy(_windows(cfg.vocab_size, batch, seq, i)).long()
        t = time.perf_counter()
        logits = model(w[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        times.append(time.perf_counter() - t)
    dt = getattr(torch, dtype_name)
    x = torch.ones(batch * seq, cfg.hidden_size, dtype=dt)
    w = torch.ones(cfg.hidden_size, cfg.intermediate_size, dtype=dt)

    def mm():
        with torch.no_grad():
            torch.mm(x, w)

    return {
        "times": times[warmup:],
        "compile_s": times[0],
        "base_mb": base,
        "loss": float(loss),
        "matmul_gflops": matmul_gflops(mm, *x.shape, w.shape[1]),
        "device_peak_mb": None,
        "trainable": sum(p.numel() for p in params),
    }


def run_worker(impl, shape, mode, args) -> dict:
    cmd = module_cmd(
        "finetune",
        "--worker",
        impl,
        shape,
        mode,
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--dtype",
        args.dtype,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--lora-rank",
        str(args.lora_rank),
        "--lora-alpha",
        str(args.lora_alpha),
        "--lora-targets",
        args.lora_targets,
    )
    return run_json(cmd, f"{impl} {shape} {mode}", env=child_env())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shape, batch 2, seq 32, 1 timed step")
    p.add_argument("--shapes", nargs="+", default=["pythia-70m", "pythia-160m"], help="config presets")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--modes", "--trainable", nargs="+", default=["biases", "all"], choices=("biases", "all", "lora"))
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="query_key_value", help="comma-separated (default PEFT's for GPT-NeoX)")
    p.add_argument("--out-dir", default="bench_out")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, shape, mode = args.worker
        fn = worker_jax if impl == "jax" else worker_torch
        res = fn(shape, mode, args.batch_size, args.seq_len, args.dtype, args.steps, args.warmup, args)
        res["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(res))
        return
    from neox_jax.model.config import preset

    if args.quick:
        args.shapes, args.batch_size, args.seq_len, args.steps, args.warmup = ["tiny"], 2, 32, 1, 1
    refs = ("torch", "transformers") + (("peft",) if "lora" in args.modes else ())
    impls = ("jax",) if reference_skipped("the PyTorch train step", refs) else ("jax", "torch")
    rows = []
    for shape in args.shapes:
        for mode in args.modes:
            for impl in impls:
                r = run_worker(impl, shape, mode, args)
                med = sorted(r["times"])[len(r["times"]) // 2]
                gflop = step_gflop(preset(shape), mode, args.batch_size * args.seq_len)
                rows.append(
                    {
                        "shape": shape,
                        "trainable": mode,
                        "impl": impl,
                        "trainable_params": r["trainable"],
                        "tokens_per_s": args.batch_size * args.seq_len / med,
                        "step_ms": med * 1e3,
                        "first_step_s": r["compile_s"],
                        "peak_rss_mb": r["peak_rss_mb"],
                        "train_mb": r["peak_rss_mb"] - r["base_mb"],
                        "device_peak_mb": r["device_peak_mb"],
                        "loss": r["loss"],
                        "gflop": gflop,
                        "matmul_gflops": r["matmul_gflops"],
                        "floor_ms": gflop / r["matmul_gflops"] * 1e3,
                        "of_floor": gflop / r["matmul_gflops"] / med,
                    }
                )
                print(
                    f"{shape} {mode} {impl}: {rows[-1]['tokens_per_s']:.0f} tokens/s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    for r in rows:
        same = [o for o in rows if o["shape"] == r["shape"] and o["trainable"] == r["trainable"]]
        other = next((o for o in same if o["impl"] != r["impl"]), None)
        r["speed_vs_other"] = r["tokens_per_s"] / other["tokens_per_s"] if other else ""
    cols = [
        "shape",
        "trainable",
        "impl",
        "trainable_params",
        "tokens_per_s",
        "speed_vs_other",
        "step_ms",
        "first_step_s",
        "peak_rss_mb",
        "train_mb",
        "gflop",
        "matmul_gflops",
        "floor_ms",
        "of_floor",
    ]
    table = markdown_table(rows, cols)
    setup = {
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "quick": args.quick,
        "cpu_count": os.cpu_count(),
    }
    if "lora" in args.modes:
        setup.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets)
    print(
        f"fine-tuning, batch {args.batch_size} x seq {args.seq_len}, {args.dtype}, AdamW + clip 1.0, "
        f"median of {args.steps} steps:\n\n{table}"
    )
    path = write_json("finetune", {"setup": setup, "rows": rows, "markdown": table}, args.out_dir)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
