"""Which GPU setups a model fits on, per dtype. By default generate's real prefill and decode chunk compiled for
model=N simulated CPU devices (N from --gpus), bytes per device from XLA's memory analysis (inference/memory.py;
how CPU's numbers differ from a GPU's: docs/gpu.md):

    neox-jax memory-plan                       # neox-20b, batch 1, 2048 tokens, 1/2/4/8 GPUs, fp16/bf16/int8
    neox-jax memory-plan --preset pythia-12b --batch 8 --length 1024 --dtypes fp16,int8

--estimate: the instant hand estimate over 13 common setups (kept because compiling a 20B model takes about a minute
per GPU count and dtype). Nothing is allocated; no GPU needed. Per device:
  params      eval_shape of the preset, each array's shard shape under the rules (replicated layernorms and row-parallel
              biases counted on every device); int8 = 1 byte per matrix element (kernels, embeddings), vectors fp16
  kv cache    2 (K, V) x layers x batch x length x hidden x 2 bytes (fp16 / bf16), split over heads
  prefill     the largest live activations of one forward over the whole prompt: fp32 attention scores and
              probabilities [B, N/m, T, T], the fp32 logits [B, T, V/m] and the MLP's [B, T, F/m] (a rough bound)
  reserve     1 GiB for the CUDA context and XLA's workspace
  LoRA        fine-tuning with --lora-rank r adds float32 adapters, their gradients and AdamW's two moments
              (16 bytes per adapter parameter) to the frozen base in the compute dtype; the optimizer state is the
              adapters' alone (activations not counted)
Fits when the sum is at most the card's memory (start JAX with XLA_PYTHON_CLIENT_MEM_FRACTION=.95: by default it
takes 75% of the card).

Training (--train bitfit|lora|full): the real train step compiled for simulated CPU devices, bytes per device from
XLA's own memory analysis (training/memory.py; how CPU's numbers differ from a GPU's: docs/finetuning.md):

    neox-jax memory-plan --train bitfit --length 2048 --remat full          # 1, 2, 4, 8 GPUs, tensor parallel
    neox-jax memory-plan --train full --parallel fsdp --gpus 8 --gpu-gib 80
    neox-jax memory-plan --train lora --preset pythia-1b --mesh fsdp=2,model=2
"""

from __future__ import annotations

import argparse

HELP = "which GPU setups a model fits on, for inference or training (XLA's compiled analysis); allocates nothing"

GIB = 2**30
# (setup, GPUs, GiB per GPU)
SETUPS = [
    ("1x 24 GB (RTX 3090 / 4090, A10G, L4)", 1, 24),
    ("1x 40 GB (A100-40G)", 1, 40),
    ("1x 48 GB (A6000, L40S)", 1, 48),
    ("1x 80 GB (A100-80G, H100)", 1, 80),
    ("1x 141 GB (H200)", 1, 141),
    ("2x 16 GB (V100-16G, T4)", 2, 16),
    ("2x 24 GB", 2, 24),
    ("2x 40 GB", 2, 40),
    ("2x 48 GB", 2, 48),
    ("4x 16 GB", 4, 16),
    ("4x 24 GB", 4, 24),
    ("8x 16 GB", 8, 16),
    ("8x 24 GB", 8, 24),
]
DTYPES = {"fp16": ("float16", None), "bf16": ("bfloat16", None), "int8": ("float16", 1)}


def plan(cfg, gpus: int, batch: int, length: int) -> dict[str, float]:
    """GiB per device of each part, per dtype, for tensor parallel over `gpus` devices."""
    from neox_jax.parallel import sharding

    mesh = sharding.abstract_mesh({"data": 1, "model": gpus})
    m = gpus
    kv = sharding.kv_cache_bytes_per_device(cfg, mesh, batch, length, "float16")
    prefill = (
        2 * batch * cfg.num_attention_heads // m * length * length * 4
        + batch * length * cfg.vocab_size // m * 4
        + 2 * batch * length * cfg.intermediate_size // m * 4
    )
    out = {"kv": kv / GIB, "prefill": prefill / GIB}
    for name, (dtype, weight_bytes) in DTYPES.items():
        out[name] = sharding.param_bytes_per_device(cfg, mesh, dtype, weight_bytes) / GIB
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="neox-20b", help="a config preset (default neox-20b)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded at once (default 1)")
    p.add_argument("--length", type=int, default=2048, help="prompt + generated tokens (default 2048)")
    p.add_argument("--reserve", type=float, default=1.0, help="GiB per GPU kept for CUDA / XLA (default 1)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank for the fine-tuning line (default 8)")
    t = p.add_argument_group("training (--train): the compiled train step")
    p.add_argument("--dtypes", default="fp16,bf16,int8", help="inference dtypes, one row each (fp16,bf16,int8)")
    p.add_argument("--estimate", action="store_true", help="inference: the instant hand estimate, no compiling")
    t.add_argument("--train", choices=("bitfit", "lora", "full"), help="plan a fine-tuning step instead of inference")
    t.add_argument("--remat", choices=("none", "dots", "full"), default="full", help="--remat of finetune (full)")
    t.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="compute dtype (bf16)")
    t.add_argument("--gpus", default="1,2,4,8", help="GPU counts, one row each (default 1,2,4,8)")
    t.add_argument("--parallel", choices=("model", "fsdp"), default="model", help="mesh of N GPUs: model=N or fsdp=N")
    t.add_argument("--mesh", help="one explicit mesh instead of --gpus / --parallel, e.g. fsdp=4,model=2")
    t.add_argument("--gpu-gib", type=float, default=80.0, help="GiB per GPU for the fits column (default 80)")


def run(args: argparse.Namespace) -> int:
    from neox_jax.errors import NeoXError
    from neox_jax.model.config import preset

    try:
        cfg = preset(args.preset)
    except ValueError as e:
        raise NeoXError(str(e)) from e
    if args.train:
        return run_train(args, cfg)
    if not args.estimate:
        return run_infer(args, cfg)
    print(
        f"{args.preset}: {cfg.num_params / 1e9:.2f}B params = {cfg.num_params * 2 / 1e9:.1f} GB in fp16; "
        f"batch {args.batch} x {args.length} tokens; GiB per GPU (params + KV cache + prefill + "
        f"{args.reserve:g} reserve), mesh model=<GPUs>\n"
    )
    print("| setup | fp16 | bf16 | int8 | KV cache | prefill |")
    print("|---|---|---|---|---|---|")
    for label, gpus, gib in SETUPS:
        try:
            r = plan(cfg, gpus, args.batch, args.length)
        except ValueError as e:  # the model cannot split over this many GPUs
            print(f"| {label} | {e} | | | | |")
            continue
        cells = []
        for name in DTYPES:
            need = r[name] + r["kv"] + r["prefill"] + args.reserve
            cells.append(f"{'**yes**' if need <= gib else 'no'} ({need:.1f})")
        print(f"| {label} | {' | '.join(cells)} | {r['kv']:.2f} | {r['prefill']:.2f} |")
    one = plan(cfg, 1, args.batch, args.length)
    eight = plan(cfg, 8, args.batch, args.length)
    print(
        f"\nparams per device: fp16 {one['fp16']:.1f} GiB on one GPU, {eight['fp16']:.2f} GiB over model=8 "
        f"({one['fp16'] / eight['fp16']:.2f}x less); int8 {one['int8']:.1f} GiB on one GPU"
    )
    print(lora_line(cfg, args.lora_rank, one["fp16"]))
    return 0


def lora_line(cfg, rank: int, base_gib: float) -> str:
    """What LoRA fine-tuning adds to the frozen base: adapters + gradients + AdamW moments, all float32."""
    from neox_jax.model import lora

    parts = []
    for targets in (lora.DEFAULT_TARGETS, lora.TARGETS):
        b = lora.training_bytes(cfg, lora.LoraSpec(rank, targets=targets))
        parts.append(
            f"{'+'.join(targets) if len(targets) == 1 else 'all four block linears'}: {b['params']:,} "
            f"adapter params, {b['total'] / 2**20:.0f} MiB with gradients and AdamW state"
        )
    return (
        f"LoRA fine-tuning, r={rank} (on top of the frozen base, {base_gib:.1f} GiB in fp16 on one GPU): "
        + "; ".join(parts)
    )


def run_train(args: argparse.Namespace, cfg) -> int:
    """--train: one row per mesh, each the compiled train step's bytes per device (training/memory.py)."""
    import math

    import jax

    from neox_jax.errors import NeoXError

    try:
        counts = [int(g) for g in args.gpus.split(",")]
        sizes = [int(v.partition("=")[2]) for v in args.mesh.split(",")] if args.mesh else counts
    except ValueError:
        raise NeoXError(
            f"--gpus {args.gpus!r} / --mesh {args.mesh!r}: expected counts like 1,2,4,8 and a mesh like fsdp=4,model=2"
        ) from None
    need = math.prod(sizes) if args.mesh else max(counts)
    try:  # simulated CPU devices to compile the N-device program on (only possible before JAX starts)
        jax.config.update("jax_num_cpu_devices", need)
    except RuntimeError:
        pass
    from tqdm import tqdm

    from neox_jax.training import memory

    meshes = [args.mesh] if args.mesh else [memory.mesh_for(g, args.parallel) for g in counts]
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
    mode = memory.train_mode(args.train, args.lora_rank)
    print(
        f"{args.preset}, --train {args.train} --remat {args.remat}, {args.dtype}, batch {args.batch} x "
        f"{args.length} tokens: GiB per GPU of the compiled train step (XLA CPU's memory analysis) + "
        f"{memory.RESERVE_GIB:g} reserve\n"
    )
    print(
        f"| mesh | arguments (state + frozen + batch) | temp (activations, gradients) | of which CPU-only copies | "
        f"GPU peak + reserve | fits {args.gpu_gib:g} GB |"
    )
    print("|---|---|---|---|---|---|")
    for mesh in tqdm(meshes, desc="compiling", unit="mesh", leave=False):
        try:
            plan = memory.train_plan(cfg, mode, args.batch, args.length, args.remat, mesh, dtype)
        except ValueError as e:  # the model cannot split over this mesh
            print(f"| {mesh} | {e} | | | | |")
            continue
        need_gib = plan.gpu_peak / memory.GIB + memory.RESERVE_GIB
        fits = "**yes**" if need_gib <= args.gpu_gib else "no"
        print(
            f"| {mesh} | {plan.arguments / memory.GIB:.2f} | {plan.temp / memory.GIB:.2f} | "
            f"{plan.cpu_copies / memory.GIB:.2f} | {need_gib:.2f} | {fits} |",
            flush=True,
        )
    return 0


def _start_devices(n: int) -> None:
    import jax

    try:  # simulated CPU devices to compile the N-device program on (only possible before JAX starts)
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass


def run_infer(args: argparse.Namespace, cfg) -> int:
    """Inference: one row per GPU count, generate's compiled prefill and decode chunk per dtype
    (inference/memory.py), GiB per device."""
    from neox_jax.errors import NeoXError

    try:
        counts = [int(g) for g in args.gpus.split(",")]
    except ValueError:
        raise NeoXError(f"--gpus {args.gpus!r}: expected counts like 1,2,4,8") from None
    _start_devices(max(counts))
    from tqdm import tqdm

    from neox_jax.inference import memory

    print(
        f"{args.preset}, batch {args.batch} x {args.length} tokens: GiB per GPU of generate's compiled prefill and "
        f"decode chunk (XLA CPU's memory analysis, GPU layout) + {memory.RESERVE_GIB:g} reserve; mesh model=<GPUs>\n"
    )
    print(
        "| GPUs | dtype | prefill args / out / temp | decode args / out / temp | CPU-only f32 copies | GPU need | "
        f"fits {args.gpu_gib:g} GB | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for g in tqdm(counts, desc="compiling", unit="mesh", leave=False):
        for name in args.dtypes.split(","):
            try:
                plans = memory.infer_plan(cfg, name, args.batch, args.length, f"model={g}")
            except ValueError as e:  # the model cannot split over this many GPUs
                print(f"| {g} | {name} | {e} | | | | | |")
                continue
            cells = [
                f"{p.arguments / memory.GIB:.2f} / {p.outputs / memory.GIB:.2f} / {p.temp / memory.GIB:.2f}"
                for p in plans.values()
            ]
            need = memory.need_gib(plans)
            secs = sum(p.compile_s for p in plans.values())
            copies = max(p.cpu_copies for p in plans.values()) / memory.GIB
            print(
                f"| {g} | {name} | {' | '.join(cells)} | {copies:.2f} | {need:.2f} | "
                f"{'**yes**' if need <= args.gpu_gib else 'no'} | {secs:.0f} |",
                flush=True,
            )
    return 0
