"""FSDP (an `fsdp` mesh axis: weights, gradients and optimizer state split over their hidden axis, ZeRO-3 style): the
step equals the single-device one on 8 simulated devices, the state really is split, and a checkpoint saved on one
mesh shape resumes on another."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from neox_jax.parallel.sharding import batch_sharding, make_mesh
from neox_jax.training import stacking
from neox_jax.training import step as ft

# make_optimizer's shape with SGD: Adam turns the reduction-order noise of exactly-zero gradients into +-lr steps
# (tests/test_finetune.py::test_sharded_step_equals_single_device)
LR = 0.5
TX = optax.chain(optax.identity(), optax.inject_hyperparams(optax.sgd)(learning_rate=LR))


def _windows(vocab, seed):
    return np.random.RandomState(seed).randint(0, vocab, (8, 17)).astype(np.int32)


def _host(tree):
    return stacking.unstack_host(jax.tree.map(np.asarray, jax.device_get(tree)))


def _start(ckpt, mesh, mode="all", remat="none"):
    stacked = stacking.stacked_for(remat)
    cfg, trainable, frozen = ft.load_for_training(ckpt, mode, jnp.float32, mesh, stacked=stacked)
    state = ft.init_state(trainable, TX, ft.state_shardings(cfg, mesh, mode, TX, stacked), dynamic=False)
    step = ft.make_train_step(cfg, TX, jnp.float32, mesh, mode, dynamic=False, donate=False, remat=remat)
    return cfg, state, frozen, step


def _run(cfg, state, frozen, step, mesh, seeds):
    metrics = []
    for seed in seeds:
        state, m = step(state, frozen, jax.device_put(_windows(cfg.vocab_size, seed), batch_sharding(mesh)))
        metrics.append(jax.device_get(m))
    return state, metrics


@pytest.fixture(scope="module")
def devices():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return jax.devices()


def test_fsdp_step_equals_single_device_and_state_is_split(tiny_ckpt, devices):
    _, ckpt = tiny_ckpt
    one = make_mesh("data=1,model=1", devices[:1])
    cfg, s1, f1, step1 = _start(ckpt, one)
    start = _host(s1["params"])
    s1, m1 = _run(cfg, s1, f1, step1, one, (0, 1))
    fsdp = make_mesh("fsdp=4,model=2", devices)
    cfg, s8, f8, step8 = _start(ckpt, fsdp, remat="full")  # per-layer gathers under the stacked scan
    kernel = s8["params"]["layers"]["attention"]["query_key_value"]["kernel"]  # [L, D, N, 3, H]
    assert kernel.sharding.spec[:3] == (None, "fsdp", "model")  # hidden over fsdp, heads over model
    assert kernel.addressable_shards[0].data.shape == (2, 64 // 4, 4 // 2, 3, 16)
    s8, m8 = _run(cfg, s8, f8, step8, fsdp, (0, 1))
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-6)
    scale = max(float(m["grad_norm"]) for m in m1)
    d1 = jax.tree.map(lambda a, b: (a - b) / LR, _host(s1["params"]), start)
    d8 = jax.tree.map(lambda a, b: (a - b) / LR, _host(s8["params"]), start)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * scale), d1, d8)


def test_adamw_moments_and_frozen_weights_split_over_fsdp(devices):
    from neox_jax.model.config import preset

    cfg, mesh = preset("tiny"), make_mesh("fsdp=8", devices)
    tx = ft.make_optimizer(ft.make_schedule(1e-3, 10))
    sh = ft.state_shardings(cfg, mesh, "all", tx)
    adam = sh["opt_state"][1].inner_state[0]
    for tree in (sh["params"], adam.mu, adam.nu):
        assert tree["layers"][0]["mlp"]["dense_h_to_4h"]["kernel"].spec == P("fsdp", None)  # [D, F]
        assert tree["layers"][0]["mlp"]["dense_4h_to_h"]["kernel"].spec == P(None, "fsdp")  # [F, D]
        assert tree["embed_in"]["embedding"].spec == P(None, "fsdp")  # [V, D]
    frozen = ft.frozen_shardings(cfg, mesh, "biases")  # BitFit: the frozen base split the same way
    assert frozen["layers"][1]["attention"]["dense"]["kernel"].spec == P(None, None, "fsdp")  # [N, H, D]
    assert batch_sharding(mesh).spec == P("fsdp", None)


def test_checkpoint_resumes_on_another_mesh(tiny_ckpt, devices, tmp_path):
    """Step 1 on data=2 x model=4, saved as `neox-jax finetune` saves (Orbax), restored onto fsdp=4 x model=2 for
    step 2: the same state and loss as two steps on one mesh."""
    _, ckpt = tiny_ckpt
    a = make_mesh("data=2,model=4", devices)
    cfg, state, frozen, step = _start(ckpt, a, "biases")
    state, _ = _run(cfg, state, frozen, step, a, (0,))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        mgr.wait_until_finished()
    through, m_a = _run(cfg, state, frozen, step, a, (1,))
    b = make_mesh("fsdp=4,model=2", devices)
    cfg, fresh, frozen_b, step_b = _start(ckpt, b, "biases")
    shardings = ft.state_shardings(cfg, b, "biases", TX)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), fresh, shardings)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        restored = mgr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    bias = restored["params"]["layers"][0]["attention"]["query_key_value"]["bias"]
    assert bias.sharding.mesh.shape == b.shape and int(restored["step"]) == 1
    resumed, m_b = _run(cfg, restored, frozen_b, step_b, b, (1,))
    np.testing.assert_allclose(m_b[0]["loss"], m_a[0]["loss"], rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=0, atol=1e-6), _host(through), _host(resumed))
