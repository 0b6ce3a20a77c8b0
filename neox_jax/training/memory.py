"""Per-device bytes of the real training step, from XLA's own compiled memory analysis, with nothing allocated.

    plan = train_plan(preset("neox-20b"), "biases", batch=1, length=2048, remat="full", mesh="model=4")
    plan.peak / 2**30   # GiB per device

The jitted step of training/step.py (the one `neox-jax finetune` runs) is lowered with jax.ShapeDtypeStruct inputs
placed by the sharding rules on a mesh of simulated CPU devices, compiled, and its `memory_analysis()` read:
  arguments  the train state (float32 masters, AdamW moments, loss scale, RNG, step) + the frozen weights + the batch
  outputs    the new state and the metrics; `alias` is what the donated state's buffers give back to them
  temp       XLA's buffer assignment for everything else: activations kept for the backward pass, gradients,
             temporaries (the peak of its heap simulation)
  peak       arguments + outputs - alias + temp: every byte the step's buffers need at once, per device.
The train step's programs are SPMD: one per device, so these are per-device numbers.

How CPU's analysis can differ from a GPU's (docs/finetuning.md has the measured numbers): the program compiled here
is XLA CPU's. (1) Attention: on GPU the step takes cuDNN's fused attention (model/attention.py), which never holds
the [B, N, T, T] scores; CPU's plan holds them (under remat, one layer's worth at a time) — an overestimate of
B x N/m x T x T x 4 bytes x a few. (2) XLA CPU multiplies bfloat16 in float32 for transposed operands, so the backward
pass converts weights and activations to float32 temporaries cuBLAS does not need — again an overestimate. (3) GPU
fuses differently (fewer, larger fusions keep fewer intermediates) and adds what no compiler counts: the CUDA context
and cuBLAS / cuDNN workspaces (RESERVE_GIB) and the allocator's fragmentation.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp

from neox_jax.errors import NeoXError
from neox_jax.model.neox import abstract_params
from neox_jax.parallel.sharding import batch_sharding, check_divisible, make_mesh
from neox_jax.training import stacking
from neox_jax.training import step as ft

GIB = 2**30
RESERVE_GIB = 1.0  # CUDA context + cuBLAS / cuDNN workspace, per GPU


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    arguments: int  # bytes per device
    outputs: int
    alias: int
    temp: int
    cpu_copies: int = 0  # of temp: float32 copies of half-precision weights that only XLA CPU makes (cpu_copies)
    compile_s: float = 0.0

    @property
    def peak(self) -> int:
        """What XLA CPU's program needs at once, per device."""
        return self.arguments + self.outputs - self.alias + self.temp

    @property
    def gpu_peak(self) -> int:
        """peak without the CPU-only float32 weight copies: the plan for a GPU."""
        return self.peak - self.cpu_copies


def cpu_copies(compiled, frozen, min_ndim: int = 3, widened=(jnp.bfloat16, jnp.float16)) -> int:
    """Bytes per device of the float32 copies XLA CPU carries of stacked half-precision frozen weights. Its float
    normalisation widens a bfloat16 / float16 operand it cannot slice or multiply natively, and the widening of the
    layer loop's weights is hoisted out of the loop: a float32 [L, ...] twin of each stacked weight (found in the
    compiled HLO by its per-device shape). A GPU multiplies half precision natively and makes none. min_ndim: the
    leaves looked at (inference's unstacked kernels: 2); widened: their dtypes (inference adds int8, which XLA CPU
    dequantizes to float32 for every matrix at once)."""
    text = compiled.as_text()
    total = 0
    for x in jax.tree.leaves(frozen):
        if x.ndim < min_ndim or x.dtype not in widened:
            continue
        shard = x.sharding.shard_shape(x.shape)
        if f"f32[{','.join(map(str, shard))}]" in text:
            total += 4 * math.prod(shard)
    return total


def plan_devices(n: int) -> list:
    """n CPU devices to compile on: simulated ones (jax_num_cpu_devices) when JAX has not started yet."""
    try:
        if len(jax.devices("cpu")) >= n:
            return jax.devices("cpu")[:n]
    except RuntimeError:
        pass
    raise NeoXError(
        f"memory-plan needs {n} CPU devices to compile the {n}-device program, but JAX has "
        f"{len(jax.devices('cpu'))}: run with XLA_FLAGS=--xla_force_host_platform_device_count={n} (the "
        f"`neox-jax memory-plan` command sets it itself when JAX has not started yet)"
    )


def abstract_inputs(cfg, mode, tx, mesh, batch: int, length: int, dtype, remat: str, transposed_copies: bool):
    """(state, frozen, windows) as ShapeDtypeStructs carrying their shardings: nothing allocated."""
    stacked = stacking.stacked_for(remat)
    st_sh = ft.state_shardings(cfg, mesh, mode, tx, stacked)
    params = ft.abstract_trainable(cfg, mode, stacked)
    state = {
        "params": params,
        "opt_state": jax.eval_shape(tx.init, params),
        "loss_scale": jax.eval_shape(lambda: ft.init_loss_scale(False)),
        "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, st_sh)
    frozen = ft.split_params(abstract_params(cfg, dtype), mode)[1]
    if ft.wants_backward_kernels(dtype, mesh, transposed_copies):
        frozen = ft._add_kernels_t(frozen, lambda name, k: jax.eval_shape(lambda k: ft.transpose_kernel(name, k), k))
    frozen = stacking.stack_abstract(frozen) if stacked else frozen
    fr_sh = ft.frozen_shardings(cfg, mesh, mode, dtype, transposed_copies, stacked)
    frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen, fr_sh)
    windows = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32, sharding=batch_sharding(mesh))
    return state, frozen, windows


def compile_train_step(cfg, mode, batch: int, length: int, remat: str, mesh, dtype=jnp.bfloat16, **kw):
    """The compiled train step (make_train_step, donating its state, as `neox-jax finetune` runs it) and its
    abstract inputs. kw: transposed_copies (default False: the GPU program has no CPU-only copies), lr."""
    transposed_copies = kw.pop("transposed_copies", False)
    tx = ft.make_optimizer(ft.make_schedule(kw.pop("lr", 1e-4), 1000))
    dtype = jnp.dtype(dtype)
    step = ft.make_train_step(
        cfg, tx, dtype, mesh, mode, dynamic=dtype == jnp.float16, transposed_copies=transposed_copies, remat=remat
    )
    inputs = abstract_inputs(cfg, mode, tx, mesh, batch, length, dtype, remat, transposed_copies)
    return step.lower(*inputs).compile(), inputs


def train_plan(cfg, mode, batch: int, length: int, remat: str = "full", mesh="model=1", dtype=jnp.bfloat16):
    """TrainPlan of one train step per device. mesh: a spec ('fsdp=4,model=2') or a Mesh."""
    if isinstance(mesh, str):
        mesh = make_mesh(mesh, plan_devices(_devices_in(mesh)))
    check_divisible(cfg, mesh, batch)
    t0 = time.perf_counter()
    compiled, inputs = compile_train_step(cfg, mode, batch, length, remat, mesh, dtype)
    ma = compiled.memory_analysis()
    return TrainPlan(
        ma.argument_size_in_bytes,
        ma.output_size_in_bytes,
        ma.alias_size_in_bytes,
        ma.temp_size_in_bytes,
        cpu_copies(compiled, inputs[1]) if stacking.stacked_for(remat) else 0,
        time.perf_counter() - t0,
    )


def _devices_in(spec: str) -> int:
    n = 1
    for part in spec.split(","):
        name, _, value = part.strip().partition("=")
        if not value.strip().isdigit():
            raise NeoXError(f"--mesh {spec!r}: give every axis a size for planning (e.g. 'fsdp=4,model=2')")
        n *= int(value)
    return n


TRAIN_MODES = ("bitfit", "lora", "full")


def train_mode(name: str, lora_rank: int = 8):
    """memory-plan's --train names -> training/step.py's modes: bitfit "biases", full "all", lora a LoraSpec
    (PEFT's default targets, alpha = rank)."""
    from neox_jax.model import lora

    modes = {"bitfit": "biases", "full": "all", "lora": lora.LoraSpec(lora_rank, float(lora_rank))}
    if name not in modes:
        raise NeoXError(f"--train {name!r}: expected one of {TRAIN_MODES}")
    return modes[name]


def mesh_for(gpus: int, parallel: str) -> str:
    """The mesh of `gpus` devices: tensor parallel (model=N) or fully sharded data parallel (fsdp=N)."""
    if parallel not in ("model", "fsdp"):
        raise NeoXError(f"--parallel {parallel!r}: expected model or fsdp")
    return f"{parallel}={gpus}"
