"""Measures the peak memory of one train step on CPU, beside memory-plan's number for the same compiled step
(tests/test_memory_plan.py starts it in a fresh process). Not a test module itself.

The measurement: the process's resident set (Linux VmRSS / VmHWM). Run with MALLOC_MMAP_THRESHOLD_=65536 so every
buffer over 64 KiB is its own mmap, returned to the system when freed (no heap reuse hides or inflates it): the rise of
the high-water mark from before the inputs exist to the end of the step is the bytes the step's buffers really
touched. Prints one JSON line: {"plan": {...}, "measured": bytes}."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys

import jax
import jax.numpy as jnp


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _filled(inputs):
    """Every leaf its own value (1, 2, ...: XLA may hand one buffer back for equal constants), keys a real key."""
    leaves, treedef = jax.tree.flatten(inputs)
    made = [
        jax.random.key(0)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        else jnp.full(x.shape, i % 2 + 1, x.dtype)
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, made)


def measure(compiled, inputs) -> int:
    """The rise of the resident high-water mark while the compiled program runs on inputs made like `inputs`."""
    make = jax.jit(lambda: _filled(inputs))
    jax.block_until_ready(make())  # compiles `make` (and frees its buffers) before the baseline
    gc.collect()
    before = _status("VmRSS")
    args = jax.block_until_ready(make())
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    out = jax.block_until_ready(compiled(*args))
    measured = _status("VmHWM") - before
    del out
    return measured


def main() -> None:
    from neox_jax.model.config import preset
    from neox_jax.parallel.sharding import make_mesh

    cfg = dataclasses.replace(preset("tiny"), hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    mesh = make_mesh("data=1,model=1", jax.devices()[:1])
    if sys.argv[1] in ("prefill", "decode"):  # generate's program (inference/memory.py): batch, length
        from neox_jax.inference import memory

        programs = memory.compile_programs(cfg, jnp.float32, int(sys.argv[2]), int(sys.argv[3]), mesh)
        compiled, inputs, _ = programs[sys.argv[1]]
        plan = memory.plan_of(compiled)
    else:
        from neox_jax.training import memory

        mode, remat, batch, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        compiled, inputs = memory.compile_train_step(cfg, mode, batch, length, remat, mesh, jnp.float32)
        ma = compiled.memory_analysis()
        plan = memory.TrainPlan(
            ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes, ma.temp_size_in_bytes
        )
    measured = measure(compiled, inputs)
    print(json.dumps({"plan": dataclasses.asdict(plan) | {"peak": plan.peak}, "measured": measured}))


if __name__ == "__main__":
    main()
