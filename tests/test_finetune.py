"""Bias fine-tuning: gradients equal PyTorch autograd, sharded == single device, fp16 loss scaling, the loss falls,
interrupted + resumed == uninterrupted, frozen tensors untouched, merge == load(finetuned=), NaN stops cleanly."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import neox_jax
from conftest import SHARED_DATA, run_cli, train_char_bpe
from neox_jax.parallel.sharding import batch_sharding, make_mesh
from neox_jax.store import checkpoint
from neox_jax.store.tokenizer import Tokenizer
from neox_jax.training import data
from neox_jax.training import step as ft

SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
WORDS = "the king queen lord speak hear love death night day sword crown heart blood fair good".split()


def _text(seed=0, n=3000):
    rng = np.random.RandomState(seed)
    lines = [" ".join(rng.choice(WORDS, rng.randint(3, 9))).capitalize() + "." for _ in range(n // 6)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A character-level BPE with 128 ids (the tiny HF model's vocab), trained here on printable ASCII."""
    return train_char_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json", [_text(1, 20000)])


def _setup(ckpt, mesh, dtype=jnp.float32, mode="biases", lr=1e-3, total=10, dynamic=None, scale=2.0**15, period=2000):
    cfg, trainable, frozen = ft.load_for_training(ckpt, mode, dtype, mesh)
    tx = ft.make_optimizer(ft.make_schedule(lr, total, 0, "constant"))
    dynamic = dtype == jnp.float16 if dynamic is None else dynamic
    state = ft.init_state(trainable, tx, ft.state_shardings(cfg, mesh, mode, tx), dynamic=dynamic, initial_scale=scale)
    step = ft.make_train_step(cfg, tx, dtype, mesh, mode, dynamic=dynamic, scale_period=period, donate=False)
    return cfg, state, frozen, step


def _windows(vocab, shape=(4, 17), seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


# ---- library level ---------------------------------------------------------------------------------------------------


def test_trainable_subsets():
    params = neox_jax.model.neox.abstract_params(neox_jax.preset("tiny"))
    t, f = ft.split_params(params, "biases")
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]}
    assert names == {f"['layers'][{i}]['{a}']['{b}']['bias']" for i in range(2) for a, b, _ in ft.BIAS_PATHS}
    assert "bias" in f["layers"][0]["mlp"]["dense_4h_to_h"]  # redundant under the parallel residual: frozen
    assert ft.merge_params(t, f) == params
    assert ft.split_params(params, "all")[1] == {}


def test_bias_grads_equal_torch(tiny_ckpt):
    import torch

    model, ckpt = tiny_ckpt
    ids = _windows(model.config.vocab_size, (2, 17), seed=1)
    mesh = make_mesh("data=1,model=1", jax.devices()[:1])
    cfg, trainable, frozen = ft.load_for_training(ckpt, "biases", jnp.float32, mesh)
    loss, grads = jax.jit(lambda t, f, w: ft.loss_and_grads(cfg, t, f, w, jnp.float32))(trainable, frozen, ids)
    model.zero_grad()
    x = torch.tensor(ids, dtype=torch.long)
    logits = model(x[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    ref.backward()
    assert abs(float(loss) - ref.item()) <= 1e-5 * abs(ref.item())
    n, h = cfg.num_attention_heads, cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        layer = model.gpt_neox.layers[i]
        pairs = [
            (
                grads["layers"][i]["attention"]["query_key_value"]["bias"],
                layer.attention.query_key_value.bias.grad.numpy().reshape(n, 3, h),
            ),
            (grads["layers"][i]["attention"]["dense"]["bias"], layer.attention.dense.bias.grad.numpy()),
            (grads["layers"][i]["mlp"]["dense_h_to_4h"]["bias"], layer.mlp.dense_h_to_4h.bias.grad.numpy()),
        ]
        for ours, theirs in pairs:
            rel = np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs)
            assert rel <= 1e-4, (i, rel)


def test_sharded_step_equals_single_device(tiny_ckpt):
    """data=2 x model=4 vs one device, two train steps: the same losses, gradient norms and parameter updates up to
    float reduction order. The step runs with SGD here: Adam divides by sqrt(v), which turns the reduction-order noise
    of a zero gradient (the key bias's, exactly zero in exact arithmetic: softmax ignores a per-query constant) into
    steps of +-lr, so Adam's params would differ between any two reduction orders; SGD's update is the gradient."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    _, ckpt = tiny_ckpt
    lr, results = 0.5, []
    tx = optax.chain(optax.identity(), optax.inject_hyperparams(optax.sgd)(learning_rate=lr))  # make_optimizer's shape
    for mesh in (make_mesh("data=1,model=1", jax.devices()[:1]), make_mesh("data=2,model=4")):
        cfg, trainable, frozen = ft.load_for_training(ckpt, "biases", jnp.float32, mesh)
        state = ft.init_state(trainable, tx, ft.state_shardings(cfg, mesh, "biases", tx), dynamic=False)
        step = ft.make_train_step(cfg, tx, jnp.float32, mesh, "biases", dynamic=False, donate=False)
        start, metrics = _host(state["params"]), []
        for seed in range(2):
            state, m = step(state, frozen, jax.device_put(_windows(cfg.vocab_size, seed=seed), batch_sharding(mesh)))
            metrics.append(_host(m))
        qkv = state["params"]["layers"][0]["attention"]["query_key_value"]["bias"]
        delta = jax.tree.map(lambda a, b: (a - b) / lr, _host(state["params"]), start)  # minus the summed gradients
        results.append((metrics, delta, qkv.sharding))
    (m1, d1, _), (m8, d8, sharding8) = results
    assert sharding8.spec[0] == "model"  # really split over heads
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
    scale = max(float(m["grad_norm"]) for m in m1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale), d1, d8)


def test_matmul_f32_gradient_runs_in_operand_dtype():
    """matmul_f32's gradient runs in the operands' dtype: the float32 cotangent rounded to it, float32 accumulation;
    with a transposed copy of the weights (how half-precision training on CPU runs) and without one alike."""
    from neox_jax.model.neox import matmul_f32

    rng = np.random.RandomState(0)
    x, w = (jnp.asarray(rng.randn(*s), jnp.bfloat16) for s in ((6, 5), (5, 7)))
    g = jnp.asarray(rng.randn(6, 7), jnp.float32)
    g16 = np.asarray(g.astype(jnp.bfloat16), np.float64)  # what the products see
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    for w_t in (jnp.asarray(np.asarray(w).T.copy()), None):
        y, vjp = jax.vjp(lambda x, w: matmul_f32(x, w, w_t), x, w)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), x64 @ w64, rtol=1e-6)
        dx, dw = vjp(g)
        assert dx.dtype == dw.dtype == jnp.bfloat16
        ref_dx, ref_dw = (g16 @ w64.T), (x64.T @ g16)
        # the products are exact in float32; the only error is the final rounding to bfloat16 (and, without w_t,
        # XLA may skip rounding g: allow bfloat16's own precision)
        np.testing.assert_allclose(np.asarray(dx, np.float64), ref_dx, rtol=2**-7, atol=1e-2)
        np.testing.assert_allclose(np.asarray(dw, np.float64), ref_dw, rtol=2**-7, atol=1e-2)
    # float32: exactly the plain dot's gradient
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    ours = jax.vjp(matmul_f32, x32, w32)[1](g)
    plain = jax.vjp(lambda x, w: x @ w, x32, w32)[1](g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours[:2], plain)


def test_bfloat16_training_keeps_transposed_frozen_kernels(tiny_ckpt):
    """bfloat16 on CPU: every frozen kernel gets a kernel_t copy, [O, I], sharded like it; float32 gets none; the
    bfloat16 step with them agrees with the float32 step to bfloat16 precision, on one device and on data=2 x model=4;
    transposed_copies=False leaves them out."""
    _, ckpt = tiny_ckpt
    one = make_mesh("data=1,model=1", jax.devices()[:1])
    cfg, _, frozen32 = ft.load_for_training(ckpt, "biases", jnp.float32, one)
    assert "kernel_t" not in str(jax.tree_util.tree_flatten_with_path(frozen32)[0])
    meshes = [one] + ([make_mesh("data=2,model=4")] if len(jax.devices()) >= 8 else [])
    w = _windows(cfg.vocab_size)
    _, s32, f32_, step32 = _setup(ckpt, one)
    ref = _host(step32(s32, f32_, w)[1])
    for mesh in meshes:
        cfg, state, frozen, step = _setup(ckpt, mesh, jnp.bfloat16)
        qkv = frozen["layers"][0]["attention"]["query_key_value"]
        n, h, d = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        assert qkv["kernel_t"].shape == (n * 3 * h, d) and qkv["kernel_t"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(qkv["kernel_t"]), np.asarray(qkv["kernel"]).reshape(d, -1).T)
        if mesh.shape["model"] > 1:
            assert qkv["kernel_t"].sharding.spec[0] == "model"  # split over heads, like the kernel
            assert frozen["layers"][0]["attention"]["dense"]["kernel_t"].sharding.spec[1] == "model"
        m = _host(step(state, frozen, jax.device_put(w, batch_sharding(mesh)))[1])
        np.testing.assert_allclose(m["loss"], ref["loss"], rtol=2e-2)
        np.testing.assert_allclose(m["grad_norm"], ref["grad_norm"], rtol=5e-2)
    # and without the copies (--no-transposed-copies): none in the frozen tree, the same step to bfloat16 precision
    cfg, trainable, frozen = ft.load_for_training(ckpt, "biases", jnp.bfloat16, one, transposed_copies=False)
    assert "kernel_t" not in str(jax.tree_util.tree_flatten_with_path(frozen)[0])
    tx = ft.make_optimizer(ft.make_schedule(1e-3, 10, 0, "constant"))
    state = ft.init_state(trainable, tx, ft.state_shardings(cfg, one, "biases", tx), dynamic=False)
    step = ft.make_train_step(cfg, tx, jnp.bfloat16, one, "biases", dynamic=False, transposed_copies=False)
    m = _host(step(state, frozen, w)[1])
    np.testing.assert_allclose(m["grad_norm"], ref["grad_norm"], rtol=5e-2)


def test_fp16_overflow_is_skipped_and_scale_lowered(tiny_ckpt):
    _, ckpt = tiny_ckpt
    mesh = make_mesh("data=1,model=1", jax.devices()[:1])
    # a loss scale of 2^30 makes the float16 backward pass overflow (cotangents > 65504): a real overflow
    cfg, state, frozen, step = _setup(ckpt, mesh, jnp.float16, scale=2.0**30, period=2)
    assert frozen["layers"][0]["attention"]["dense"]["kernel"].dtype == jnp.float16
    assert "kernel_t" not in frozen["layers"][0]["attention"]["dense"]  # float16 products are float32 on CPU anyway
    assert state["params"]["layers"][0]["attention"]["dense"]["bias"].dtype == jnp.float32  # master copy
    w = _windows(cfg.vocab_size)
    before = _host(state)
    state, m = step(state, frozen, w)
    assert bool(m["skipped"]) and np.isfinite(float(m["loss"]))
    after = _host(state)
    assert float(after["loss_scale"]["scale"]) == 2.0**29
    jax.tree.map(np.testing.assert_array_equal, after["params"], before["params"])  # update skipped
    jax.tree.map(np.testing.assert_array_equal, after["opt_state"], before["opt_state"])
    # with a workable scale the steps apply, and after `period` finite steps the scale doubles
    state = {**state, "loss_scale": ft.init_loss_scale(True, 2.0**10)}
    for _ in range(2):
        state, m = step(state, frozen, w)
        assert not bool(m["skipped"])
    assert float(state["loss_scale"]["scale"]) == 2.0**11
    assert not np.array_equal(
        _host(state["params"])["layers"][0]["attention"]["dense"]["bias"],
        before["params"]["layers"][0]["attention"]["dense"]["bias"],
    )


def test_data_pipeline(tmp_path, small_tokenizer):
    tok = Tokenizer.from_file(small_tokenizer)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "the king"}) + "\n\n" + json.dumps({"text": "a lord"}) + "\n")
    (tmp_path / "b.txt").write_text("fair day")
    docs = data.read_documents([tmp_path / "a.jsonl", tmp_path / "b.txt"])
    assert docs == ["the king", "a lord", "fair day"]
    tokens = data.tokenize(docs, tok)
    assert (tokens == tok.eos_id).sum() == 3 and tokens[-1] == tok.eos_id
    windows, dropped = data.pack(np.arange(23), 5)  # stride 5, 6 tokens each
    assert windows.shape == (4, 6) and dropped == 2 and windows[1, 0] == windows[0, -1] == 5
    b = data.Batches(np.arange(10)[:, None], 3, seed=7)
    assert b.batches_per_epoch == 3 and b.dropped_windows == 1
    pos, seen = data.Position(), []
    for _ in range(3):
        seen.append(b.get(pos)[:, 0])
        pos = b.advance(pos)
    assert pos == data.Position(1, 0) and len(set(np.concatenate(seen))) == 9
    assert np.array_equal(
        data.Batches(np.arange(10)[:, None], 3, seed=7).get(data.Position(1, 2)), b.get(data.Position(1, 2))
    )  # a fresh object gives the same batch: resumable
    assert not np.array_equal(b.order(0), b.order(1))
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(data.DataError, match="bad.jsonl:1: expected an object with a string 'text'"):
        data.read_documents([tmp_path / "bad.jsonl"])


# ---- the CLI: runs, resume, merge, NaN -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_ckpt, small_tokenizer, tmp_path_factory):
    """Run A uninterrupted; run B stopped by SIGTERM after step 11 (saved), then resumed with --resume. Both on the
    start of tiny shakespeare (synthetic text where ../shared/data is absent), on a data=2 x model=4 mesh."""
    _, ckpt = tiny_ckpt
    d = tmp_path_factory.mktemp("runs")
    text = SHAKESPEARE.read_text()[:300_000] if SHAKESPEARE.is_file() else _text(0, 60_000)
    (d / "train.txt").write_text(text)
    common = [
        "scripts/finetune.py",
        "--checkpoint",
        ckpt,
        "--tokenizer",
        small_tokenizer,
        "--data",
        d / "train.txt",
        "--seq-len",
        32,
        "--batch-size",
        8,
        "--steps",
        24,
        "--lr",
        1e-2,
        "--warmup-steps",
        3,
        "--mesh",
        "data=2,model=4" if len(jax.devices()) >= 8 else "data=1",
        "--save-every",
        5,
        "--keep",
        2,
        "--eval-every",
        8,
        "--eval-batches",
        8,
        "--no-progress",
    ]
    a = run_cli(*common, "--out", d / "A")
    b1 = run_cli(*common, "--out", d / "B", "--stop-after", 11, check=False)
    b2 = run_cli(*common, "--out", d / "B", "--resume")
    return {"dir": d, "ckpt": ckpt, "common": common, "A": d / "A", "B": d / "B", "out": (a, b1, b2)}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_tiny_shakespeare(runs):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"reference data absent: {SHAKESPEARE}")
    rows = _metrics(runs["A"])
    losses, evals = [r["loss"] for r in rows], [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
    assert len(evals) == 3 and evals[-1] < evals[0], evals
    assert (runs["A"] / "loss.png").stat().st_size > 0


def test_resume_reproduces_uninterrupted_run(runs):
    _, b1, b2 = runs["out"]
    assert b1.returncode == 128 + 15, b1.stderr  # stopped by SIGTERM, cleanly
    assert "SIGTERM" in b1.stdout and "Traceback" not in b1.stderr
    assert "resumed from" in b2.stdout and "/checkpoints/11" in b2.stdout
    a, b = _metrics(runs["A"]), _metrics(runs["B"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 25))
    for key in ("loss", "eval_loss", "lr", "grad_norm", "epoch"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    pa, pb = ft.load_finetuned(runs["A"])[1], ft.load_finetuned(runs["B"])[1]
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    assert sorted(int(p.name) for p in (runs["B"] / "checkpoints").iterdir() if p.name.isdigit()) == [20, 24]


def test_finetuned_from_relative_path(runs, monkeypatch):
    monkeypatch.chdir(runs["A"].parent)
    jax.tree.map(np.testing.assert_array_equal, ft.load_finetuned(runs["A"].name)[1], ft.load_finetuned(runs["A"])[1])


def test_frozen_tensors_bit_identical_after_training(runs):
    base = neox_jax.load(runs["ckpt"]).params
    tuned = neox_jax.load(runs["ckpt"], finetuned=runs["A"]).params
    changed = 0
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(base)[0], jax.tree.leaves(tuned)):
        keys = tuple(getattr(k, "key", k) for k in path)
        if ft.is_trainable(keys, "biases"):
            changed += not np.array_equal(x, y)
        else:
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), keys
    assert changed == 3 * 2  # every trained bias moved


def test_merge_equals_load_finetuned(runs, tmp_path, capsys):
    from neox_jax.cli import main

    out = tmp_path / "merged"
    assert main(["convert", "merge", str(runs["ckpt"]), str(runs["A"]), str(out), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    ids = _windows(128, (2, 20), seed=3)
    np.testing.assert_array_equal(
        neox_jax.load(out).logits(ids), neox_jax.load(runs["ckpt"], finetuned=runs["A"]).logits(ids)
    )
    assert checkpoint.read_metadata(out)["source"]["kind"] == "merge"


def test_nonfinite_loss_stops_without_overwriting(runs, tmp_path):
    """Resuming on a base whose final layernorm holds a NaN: the first step's loss is NaN; the run stops with a clear
    message and leaves the checkpoints, the fine-tuned params and the metrics as they were."""
    params = checkpoint.restore_params(runs["ckpt"])
    params["final_layer_norm"]["weight"] = params["final_layer_norm"]["weight"].at[0].set(jnp.nan)
    bad = checkpoint.save_params(tmp_path / "bad", checkpoint.read_config(runs["ckpt"]), params)
    run = tmp_path / "run"
    shutil.copytree(runs["B"], run)
    record = json.loads((run / "run.json").read_text())  # a resume refuses another base: record `bad` as the run's
    (run / "run.json").write_text(json.dumps({**record, "base": checkpoint.identity(bad)}))
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    args = list(runs["common"])
    args[args.index("--checkpoint") + 1], args[args.index("--steps") + 1] = bad, 30
    r = run_cli(*args, "--out", run, "--resume", "--allow-schedule-change", check=False)
    assert r.returncode == 1
    assert "loss is nan at step 25" in r.stderr and "last good checkpoint is step 24" in r.stderr
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "run.json"}
    assert after == {p: b for p, b in before.items() if p.name != "run.json"}
