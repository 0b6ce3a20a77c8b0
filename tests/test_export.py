"""Every compiled program exports for CUDA from CPU (jax.export, platforms=["cuda"]): prefill, decode, the train step
(BitFit, LoRA, full; remat; on an FSDP x tensor-parallel mesh) and the server engine's init / admit / decode. A
program that only XLA CPU can run (a CPU custom call, a host callback) fails here rather than on a GPU. Attention
traces with the per-backend choice of the tracing machine (CPU's "plain" path): cuDNN's fused attention needs a GPU
to lower and is left out."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.inference import decode
from neox_jax.inference.sampling import SamplingParams
from neox_jax.model import lora
from neox_jax.model.config import preset
from neox_jax.model.neox import abstract_params, init_params
from neox_jax.parallel.sharding import make_mesh
from neox_jax.training import memory

CFG = preset("tiny")


def export_cuda(fn, *args):
    """jax.export for CUDA; returns the StableHLO text after checking its custom calls are device-neutral."""
    exp = jax.export.export(fn, platforms=["cuda"])(*args)
    assert exp.platforms == ("cuda",)
    assert exp.mlir_module_serialized  # the StableHLO bytes a GPU machine compiles
    text = exp.mlir_module()
    targets = set(re.findall(r"custom_call @(\w+)", text)) | set(re.findall(r'call_target_name = "(\w+)"', text))
    cpu_only = {t for t in targets if "cpu" in t.lower() or "callback" in t.lower()}
    assert not cpu_only, cpu_only
    return text


def test_prefill_and_decode_export_for_cuda():
    """Generate's two programs over the decode core: prefill into a fresh state, then a decode chunk."""
    from neox_jax.inference import generate as G

    params = abstract_params(CFG, jnp.bfloat16)
    layout = decode.layout_for(params, "gpu")
    sp = SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.1)
    static = sp.static(CFG.vocab_size)
    settings = {
        **sp.values(),
        "stop_mask": jax.ShapeDtypeStruct((2, CFG.vocab_size), jnp.bool_),
        "max_new": jax.ShapeDtypeStruct((2,), jnp.int32),
    }
    settings = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.broadcast_to(x, (2,)), settings)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    prefill = jax.jit(functools.partial(G._prefill, CFG, static, layout, 2, 32, None))
    export_cuda(prefill, params, ids, ids, settings, jax.random.key(0))
    state = jax.eval_shape(prefill, params, ids, ids, settings, jax.random.key(0))
    dec = jax.jit(functools.partial(G._decode, CFG, static, layout, 4, None))
    export_cuda(dec, params, state, jax.ShapeDtypeStruct((2,), jnp.bool_), np.int32(4))


@pytest.mark.parametrize(
    "mode,remat,mesh",
    [("biases", "full", "fsdp=4,model=2"), ("lora", "dots", "data=2,model=4"), ("all", "none", "fsdp=8")],
)
def test_train_step_exports_for_cuda(mode, remat, mesh):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mode = lora.LoraSpec(4, 8.0) if mode == "lora" else mode
    mesh = make_mesh(mesh)
    from neox_jax.training import step as ft

    tx = ft.make_optimizer(ft.make_schedule(1e-4, 10))
    step = ft.make_train_step(CFG, tx, jnp.bfloat16, mesh, mode, dynamic=False, transposed_copies=False, remat=remat)
    inputs = memory.abstract_inputs(CFG, mode, tx, mesh, 8, 32, jnp.bfloat16, remat, False)
    text = export_cuda(step, *inputs)
    assert "mhlo.num_partitions = 8" in text


def test_server_engine_programs_export_for_cuda(monkeypatch):
    from neox_jax.serve import engine as E

    layout_for = decode.layout_for
    monkeypatch.setattr(E, "layout_for", lambda params, backend: layout_for(params, "gpu"))
    exported = []

    class Exporting:  # the engine's compile cache, exporting each program for CUDA instead of compiling it
        compiles = 0

        def get(self, key, fn, *args, **kwargs):
            exported.append((key, export_cuda(fn, *args, **kwargs)))

    eng = E.Engine(CFG, init_params(CFG, jnp.bfloat16), slots=2, max_model_len=64, vocab_limit=CFG.vocab_size, chunk=4)
    assert not eng.layout.transposed  # the GPU layout
    eng.programs = Exporting()
    eng._init_program()
    for p in eng.buckets:
        eng._admit_program(p)
        for r in eng.admit_rows[p]:
            eng._admit_rows_program(r, p)
    for r in eng.row_buckets:
        for w in eng.length_buckets:
            eng._decode_program(r, w)
    kinds = [k[0] for k, _ in exported]
    n_decode = len(eng.row_buckets) * len(eng.length_buckets)
    assert eng.admit_rows == {16: [2], 32: [2], 64: [2]}
    assert kinds == ["init"] + ["admit", "admit_rows"] * len(eng.buckets) + ["decode"] * n_decode
