"""Per-device bytes of the real inference programs (generate's prefill and decode chunk), from XLA's own compiled
memory analysis, with nothing allocated.

    plans = infer_plan(preset("neox-20b"), "float16", batch=1, length=2048, mesh="model=4")
    plans["decode"].peak / 2**30   # GiB per device

generate.py's jitted `_prefill` (one prompt bucket of `length` tokens into a fresh B x S cache) and `_decode` (one
decode chunk over that cache, the state donated) are lowered from jax.ShapeDtypeStruct params placed by
parallel/sharding.py's rules on simulated CPU devices, compiled, and their memory_analysis() read (training/memory.py
explains arguments / outputs / alias / temp / peak). The layout is the GPU's (`Layout(False, dtype)`: kernels as stored,
a cache in the params' dtype), not layout_for(..., "cpu"), which would add a transposed copy of every matrix and a
float32 cache that a GPU never holds.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.inference import core, generate
from neox_jax.inference.decode import Layout
from neox_jax.inference.sampling import SamplingParams
from neox_jax.model import int8
from neox_jax.model.neox import abstract_params
from neox_jax.parallel import sharding
from neox_jax.training.memory import GIB, RESERVE_GIB, TrainPlan, _devices_in, cpu_copies, plan_devices

DTYPES = {"fp16": ("float16", None), "bf16": ("bfloat16", None), "int8": ("float16", "int8")}


def abstract_inference_params(cfg, dtype, mesh, quant=None):
    """The params as ShapeDtypeStructs with their shardings (int8: quant = QuantSpec("int8"))."""
    params = abstract_params(cfg, jnp.dtype(dtype), quant=quant)
    shardings = sharding.param_shardings(cfg, mesh, quant=quant)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)


def plan_of(compiled, compile_s: float = 0.0, params=None) -> TrainPlan:
    ma = compiled.memory_analysis()
    return TrainPlan(
        ma.argument_size_in_bytes,
        ma.output_size_in_bytes,
        ma.alias_size_in_bytes,
        ma.temp_size_in_bytes,
        cpu_copies(compiled, params, 2, (jnp.bfloat16, jnp.float16, jnp.int8)) if params is not None else 0,
        compile_s,
    )


def compile_programs(cfg, dtype, batch: int, length: int, mesh, quant=None, chunk: int = 16):
    """{"prefill"|"decode": (compiled, abstract args, compile seconds)}: generate's programs for a prompt of
    `length` tokens (its bucket) and a cache of `length` slots (rounded as generate rounds), greedy, the GPU layout."""
    params = abstract_inference_params(cfg, dtype, mesh, quant)
    layout = Layout(False, "float16" if quant else jnp.dtype(dtype).name)
    static = SamplingParams(temperature=0.0).static(cfg.vocab_size)
    b = core.round_rows(batch, 1, mesh)
    p = core.prompt_bucket(length, cfg.max_position_embeddings)
    s = -(-p // core.SLOT_ROUND) * core.SLOT_ROUND
    bs = sharding.batch_sharding(mesh)
    b1 = sharding.batch_sharding(mesh, 1)
    grid = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=bs)
    settings = {k: jax.ShapeDtypeStruct((b,), jnp.float32, sharding=b1) for k in SamplingParams().values()}
    settings["stop_mask"] = jax.ShapeDtypeStruct((b, cfg.vocab_size), bool, sharding=bs)
    settings["max_new"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=b1)
    key = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    pre_args = (params, grid, grid, settings, key)
    pre = generate._prefill_jit.lower(cfg, static, layout, b, s, mesh, *pre_args).compile()
    out = {"prefill": (pre, pre_args, time.perf_counter() - t0)}
    state = jax.eval_shape(lambda *a: generate._prefill(cfg, static, layout, b, s, mesh, *a), *pre_args)
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, pre.output_shardings)
    t0 = time.perf_counter()
    dec_args = (params, state, jax.ShapeDtypeStruct((b,), bool, sharding=b1), jax.ShapeDtypeStruct((), np.int32))
    dec = generate._decode_jit.lower(cfg, static, layout, chunk, mesh, *dec_args).compile()
    out["decode"] = (dec, dec_args, time.perf_counter() - t0)
    return out


def infer_plan(cfg, name: str, batch: int, length: int, mesh="model=1") -> dict[str, TrainPlan]:
    """gpu_peak leaves out the float32 copies XLA CPU makes of half-precision kernels to multiply them (cpu_copies).
    {"prefill": TrainPlan, "decode": TrainPlan} per device for dtype name fp16 / bf16 / int8."""
    if isinstance(mesh, str):
        mesh = sharding.make_mesh(mesh, plan_devices(_devices_in(mesh)))
    sharding.check_divisible(cfg, mesh, batch)
    dtype, mode = DTYPES[name]
    programs = compile_programs(cfg, dtype, batch, length, mesh, int8.QuantSpec(mode) if mode else None)
    return {k: plan_of(c, secs, args[0]) for k, (c, args, secs) in programs.items()}


def need_gib(plans: dict[str, TrainPlan]) -> float:
    """GiB per GPU to run both programs: the larger peak (they do not run at once) + the reserve."""
    return max(p.gpu_peak for p in plans.values()) / GIB + RESERVE_GIB
