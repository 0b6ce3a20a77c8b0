"""Activation checkpointing (--remat): loss and gradients equal the plain step's in BitFit, LoRA and full training,
and it really keeps less (XLA's compiled temp bytes: plain step > dots > full)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_finetune import small_tokenizer  # noqa: F401 (a fixture)

from neox_jax.model import lora
from neox_jax.parallel.sharding import make_mesh
from neox_jax.training import stacking
from neox_jax.training import step as ft

MODES = {"biases": "biases", "lora": lora.LoraSpec(4, 8.0, targets=("query_key_value", "dense_4h_to_h")), "all": "all"}


def _grads(cfg, trainable, frozen, mode, remat):
    """(loss, gradients unrolled, temp bytes) of one compiled loss_and_grads; the stacked layout under remat."""
    if stacking.stacked_for(remat):
        copy = jax.tree.map(jnp.copy, (trainable, frozen))  # stack_arrays consumes its input
        sh = jax.tree.map(lambda x: x.sharding, copy)
        trainable, frozen = (stacking.stack_arrays(t, stacking.stack_shardings(s)) for t, s in zip(copy, sh))
    spec = mode if lora.is_lora(mode) else None
    w = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 65)).astype(np.int32)
    step = jax.jit(lambda t, f, w: ft.loss_and_grads(cfg, t, f, w, jnp.float32, lora_spec=spec, remat=remat))
    compiled = step.lower(trainable, frozen, w).compile()
    loss, grads = compiled(trainable, frozen, w)
    grads = stacking.unstack_host(jax.tree.map(np.asarray, grads))
    return float(loss), grads, compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", list(MODES))
def test_remat_equals_plain_step_and_keeps_less(tiny_ckpt, name):
    _, ckpt = tiny_ckpt
    mode, mesh = MODES[name], make_mesh("data=1,model=1", jax.devices()[:1])
    cfg, trainable, frozen = ft.load_for_training(ckpt, mode, jnp.float32, mesh, seed=1)
    if lora.is_lora(mode):  # B starts at zero (so would A's gradient): move it
        trainable = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.02 if p[-1].key == "lora_B" else x, trainable)
    loss0, g0, temp0 = _grads(cfg, trainable, frozen, mode, "none")
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g0))
    assert scale > 0
    temps = {"none": temp0}
    for remat in ("dots", "full"):
        loss, g, temps[remat] = _grads(cfg, trainable, frozen, mode, remat)
        np.testing.assert_allclose(loss, loss0, rtol=1e-6)
        assert jax.tree.structure(g) == jax.tree.structure(g0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale), g, g0)
    assert temps["full"] < temps["dots"] < temps["none"], temps


def test_finetune_run_with_remat_equals_plain_run(tiny_ckpt, small_tokenizer, tmp_path):  # noqa: F811
    """`neox-jax finetune --remat full` end to end (stacked load, train and eval steps, the saved finetuned/ unrolled
    again): the same losses and trained biases as --remat none."""
    from test_finetune import _text

    from neox_jax.training import run

    _, ckpt = tiny_ckpt
    (tmp_path / "train.txt").write_text(_text(0, 6000))
    out = {}
    for remat in ("none", "full"):
        cfg = run.RunConfig(
            str(ckpt), [str(tmp_path / "train.txt")], str(tmp_path / remat), tokenizer=str(small_tokenizer),
            seq_len=16, batch_size=4, steps=3, lr=3e-4, eval_every=3, eval_batches=2, progress=False,
            mesh="fsdp=2,model=4" if len(jax.devices()) >= 8 else "data=-1",
            remat=remat,
        )  # fmt: skip
        assert run.run(cfg) == 0
        rows = [json.loads(line) for line in (tmp_path / remat / "metrics.jsonl").read_text().splitlines()]
        out[remat] = (rows, ft.load_finetuned(tmp_path / remat)[1])
    (a, pa), (b, pb) = out["none"], out["full"]
    for key in ("loss", "eval_loss", "grad_norm"):
        np.testing.assert_allclose([r.get(key, 0.0) for r in b], [r.get(key, 0.0) for r in a], rtol=1e-6)
    # saved unrolled, like any run's; Adam turns reduction-order noise in exactly-zero gradients (the key bias's) into
    # steps of up to lr each (tests/test_finetune.py::test_sharded_step_equals_single_device): within 3 steps x lr
    assert jax.tree.structure(pb) == jax.tree.structure(pa) and 0 in pb["layers"]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=0, atol=3 * 3e-4), pa, pb)
