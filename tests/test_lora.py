"""LoRA against PEFT: the same adapter weights give the same logits (a PEFT-made adapter on every block linear with
non-zero B, and one exported from a run here), the same gradients; merged == unmerged; a resumed run (with dropout)
equals an uninterrupted one; unsupported adapters are refused by name; adapters shard like their matrices."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import neox_jax
from conftest import train_char_bpe
from neox_jax.cli import main as cli
from neox_jax.errors import NeoXError
from neox_jax.model import lora
from neox_jax.model.neox import forward
from neox_jax.parallel.sharding import batch_sharding, make_mesh
from neox_jax.store import peft as lora_peft
from neox_jax.training import step as ft
from neox_jax.training.run import RunConfig, run

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")


def _ids(vocab, shape, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def _peft_model(hf, targets, r=4, alpha=16, rslora=True, seed=1):
    """A PEFT LoRA model over a copy of the tiny HF model, A and B random (init_lora_weights=False: B non-zero)."""
    torch.manual_seed(seed)
    conf = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_rslora=rslora,
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    return peft.get_peft_model(copy.deepcopy(hf), conf).eval()


@pytest.fixture(scope="module")
def peft_adapter(tiny_ckpt, tmp_path_factory):
    hf, ckpt = tiny_ckpt
    model = _peft_model(hf, lora.TARGETS)
    d = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(d)
    return model, d, ckpt


def test_peft_adapter_logits_equal_peft(peft_adapter):
    model, d, ckpt = peft_adapter
    ids = _ids(128, (2, 19), 3)
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    merged = neox_jax.load(ckpt, adapter=d)
    np.testing.assert_allclose(merged.logits(ids), ref, rtol=1e-4, atol=1e-4)
    # unmerged (the training path: y = base(x) + scale * (x @ A) @ B inside each Linear) gives the same
    spec, adapters = lora_peft.read_adapter(d, merged.config)
    assert spec.targets == lora.TARGETS and spec.rslora and spec.scale == 16 / 2
    base = neox_jax.load(ckpt)
    unmerged = jax.jit(lambda p, i: forward(base.config, p, i, lora=spec)[0])(
        ft.merge_params(jax.tree.map(jnp.asarray, adapters), base.params), ids
    )
    np.testing.assert_allclose(np.asarray(unmerged), ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(base.logits(ids), ref, atol=1e-2)  # the adapter matters


def test_lora_grads_equal_peft(peft_adapter):
    """One LoRA loss's gradients w.r.t. every A and B (qkv, dense, h_to_4h, 4h_to_h; non-zero B) equal torch+peft's."""
    model, d, ckpt = peft_adapter
    mesh = make_mesh("data=1,model=1", jax.devices()[:1])
    cfg = neox_jax.load(ckpt).config
    spec, adapters = lora_peft.read_adapter(d, cfg)
    _, _, frozen = ft.load_for_training(ckpt, spec, jnp.float32, mesh)
    ids = _ids(cfg.vocab_size, (2, 17), 1)
    loss, grads = jax.jit(lambda t, f, w: ft.loss_and_grads(cfg, t, f, w, jnp.float32, lora_spec=spec))(
        jax.tree.map(jnp.asarray, adapters), frozen, ids
    )
    model.zero_grad()
    x = torch.tensor(ids, dtype=torch.long)
    logits = model(x[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    ref.backward()
    assert abs(float(loss) - ref.item()) <= 1e-5 * abs(ref.item())
    ours = lora_peft.to_peft_tensors(jax.tree.map(np.asarray, grads))
    theirs = {k.replace(".default", ""): p.grad.numpy() for k, p in model.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and len(ours) == 2 * 4 * cfg.num_hidden_layers
    for k, g in ours.items():
        rel = np.linalg.norm(g - theirs[k]) / np.linalg.norm(theirs[k])
        assert rel <= 1e-4, (k, rel)
    # a bfloat16 base (with the transposed kernel copies CPU training keeps) and float32 adapters: float32's
    # gradients to bfloat16 precision (B scaled down 10x: PEFT's random B at scale 8 makes the loss sharp enough that
    # bfloat16 activations alone move some gradients by 5%)
    small = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(x) * (0.1 if p[-1].key == "lora_B" else 1.0), adapters
    )
    _, grads32 = jax.jit(lambda t, f, w: ft.loss_and_grads(cfg, t, f, w, jnp.float32, lora_spec=spec))(
        small, frozen, ids
    )
    frozen16 = ft.load_for_training(ckpt, spec, jnp.bfloat16, mesh)[2]
    assert "kernel_t" in frozen16["layers"][0]["attention"]["dense"]
    _, grads16 = jax.jit(lambda t, f, w: ft.loss_and_grads(cfg, t, f, w, jnp.bfloat16, lora_spec=spec))(
        small, frozen16, ids
    )
    ours32, ours16 = (lora_peft.to_peft_tensors(jax.tree.map(np.asarray, g)) for g in (grads32, grads16))
    assert all(g.dtype == np.float32 for g in ours16.values())
    rel = {k: float(np.linalg.norm(g - ours32[k]) / np.linalg.norm(ours32[k])) for k, g in ours16.items()}
    total = np.sqrt(
        sum(np.sum((g - ours32[k]) ** 2) for k, g in ours16.items()) / sum(np.sum(g**2) for g in ours32.values())
    )
    assert total <= 2e-2 and max(rel.values()) <= 5e-2, (total, rel)


@pytest.mark.parametrize(
    "key,value",
    [
        ("use_dora", True),
        ("bias", "all"),
        ("modules_to_save", ["embed_out"]),
        ("layers_to_transform", [0]),
        ("alpha_pattern", {"dense": 4}),
    ],
)
def test_unsupported_adapter_refused_by_name(peft_adapter, tmp_path, key, value):
    _, d, ckpt = peft_adapter
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / lora_peft.WEIGHTS).write_bytes((d / lora_peft.WEIGHTS).read_bytes())
    conf = json.loads((d / lora_peft.CONFIG).read_text())
    (bad / lora_peft.CONFIG).write_text(json.dumps({**conf, key: value}))
    with pytest.raises(NeoXError, match=key):
        neox_jax.load(ckpt, adapter=bad)


def test_adapter_on_other_modules_refused(peft_adapter, tmp_path):
    _, _, ckpt = peft_adapter
    from safetensors.numpy import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / lora_peft.CONFIG).write_text(json.dumps(lora_peft.peft_config(lora.LoraSpec(rank=4))))
    save_file({"base_model.model.embed_out.lora_A.weight": np.zeros((4, 64), np.float32)}, str(bad / lora_peft.WEIGHTS))
    with pytest.raises(NeoXError, match="embed_out.lora_A.weight"):
        neox_jax.load(ckpt, adapter=bad)


def test_adapters_shard_like_their_matrices(tiny_ckpt):
    """data=2 x model=4: B of query_key_value / dense_h_to_4h split over heads / mlp, A of dense / dense_4h_to_h over
    their input; one LoRA step's loss and gradient norm equal the single-device step's."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    _, ckpt = tiny_ckpt
    spec = lora.LoraSpec(rank=4, alpha=8, targets=lora.TARGETS)
    results = []
    for mesh in (make_mesh("data=1,model=1", jax.devices()[:1]), make_mesh("data=2,model=4")):
        cfg, trainable, frozen = ft.load_for_training(ckpt, spec, jnp.float32, mesh, seed=3)
        # a non-zero B, the same on both meshes, so every adapter's gradient flows
        trainable = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.01 if p[-1].key == "lora_B" else x, trainable)
        tx = ft.make_optimizer(ft.make_schedule(1e-3, 10, 0, "constant"))
        state = ft.init_state(trainable, tx, ft.state_shardings(cfg, mesh, spec, tx), dynamic=False)
        step = ft.make_train_step(cfg, tx, jnp.float32, mesh, spec, dynamic=False, donate=False)
        _, m = step(state, frozen, jax.device_put(_ids(cfg.vocab_size, (4, 17)), batch_sharding(mesh)))
        results.append((jax.device_get(m), state["params"]["layers"][0]))
    (m1, _), (m8, layer) = results
    assert layer["attention"]["query_key_value"]["lora_B"].sharding.spec[1] == "model"
    assert layer["attention"]["dense"]["lora_A"].sharding.spec[0] == "model"
    assert layer["mlp"]["dense_h_to_4h"]["lora_B"].sharding.spec[1] == "model"
    assert layer["mlp"]["dense_4h_to_h"]["lora_A"].sharding.spec[0] == "model"
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)


# ---- runs: resume, export to PEFT, merge ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_runs(tiny_ckpt, tmp_path_factory):
    """Run A: 12 LoRA steps (qkv + dense_4h_to_h, r 4, dropout 0.1); run B: the same, stopped by SIGTERM after
    step 5 and resumed."""

    _, ckpt = tiny_ckpt
    d = tmp_path_factory.mktemp("lora_runs")
    rng = np.random.RandomState(0)
    words = ["the", "king", "queen", "lord", "speak", "hear", "love", "death", "night", "day", "sword", "crown"]
    (d / "train.txt").write_text("\n".join(" ".join(rng.choice(words, 6)) + "." for _ in range(600)))
    train_char_bpe(d / "tokenizer.json", [(d / "train.txt").read_text()])
    common = {
        "checkpoint": str(ckpt),
        "data": [str(d / "train.txt")],
        "tokenizer": str(d / "tokenizer.json"),
        "seq_len": 16,
        "batch_size": 4,
        "steps": 12,
        "lr": 1e-2,
        "save_every": 4,
        "keep": 2,
        "trainable": "lora",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_targets": "query_key_value,dense_4h_to_h",
        "lora_dropout": 0.1,
        "progress": False,
        "mesh": "data=2,model=4" if len(jax.devices()) >= 8 else "data=1",
    }
    flags = [
        "--checkpoint",
        ckpt,
        "--data",
        d / "train.txt",
        "--tokenizer",
        d / "tokenizer.json",
        "--out",
        d / "A",
        "--seq-len",
        16,
        "--batch-size",
        4,
        "--steps",
        12,
        "--lr",
        1e-2,
        "--save-every",
        4,
        "--keep",
        2,
        "--trainable",
        "lora",
        "--lora-rank",
        4,
        "--lora-alpha",
        8,
        "--lora-targets",
        "query_key_value,dense_4h_to_h",
        "--lora-dropout",
        0.1,
        "--no-progress",
        "--mesh",
        common["mesh"],
    ]
    assert cli(["finetune", *map(str, flags)]) == 0  # run A through the command line
    assert run(RunConfig(out=str(d / "B"), stop_after=5, **common)) == 128 + 15
    assert run(RunConfig(out=str(d / "B"), resume=True, **common)) == 0
    return {"ckpt": ckpt, "A": d / "A", "B": d / "B", "dir": d}


def test_lora_resume_exact(lora_runs):
    rows = [[json.loads(x) for x in (lora_runs[k] / "metrics.jsonl").read_text().splitlines()] for k in "AB"]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == list(range(1, 13))
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    (meta, pa), (_, pb) = ft.load_finetuned(lora_runs["A"]), ft.load_finetuned(lora_runs["B"])
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    assert meta["trainable"] == "lora" and meta["lora"]["rank"] == 4
    assert sorted(pa["layers"][0]) == ["attention", "mlp"] and list(pa["layers"][0]["mlp"]) == ["dense_4h_to_h"]
    assert np.abs(np.asarray(pa["layers"][1]["attention"]["query_key_value"]["lora_B"])).max() > 0  # B moved


def test_exported_adapter_loads_in_peft(lora_runs, tiny_ckpt, tmp_path):
    hf, _ = tiny_ckpt
    out = tmp_path / "adapter"
    assert cli(["convert", "to-peft", str(lora_runs["ckpt"]), str(lora_runs["A"]), str(out)]) == 0
    model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    ids = _ids(128, (2, 21), 5)
    with torch.no_grad():
        ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = neox_jax.load(lora_runs["ckpt"], finetuned=lora_runs["A"]).logits(ids)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(neox_jax.load(lora_runs["ckpt"], adapter=out).logits(ids), ref, rtol=1e-4, atol=1e-4)


def test_merge_equals_unmerged(lora_runs, tmp_path):
    merged_dir = tmp_path / "merged"
    assert cli(["convert", "merge", str(lora_runs["ckpt"]), str(lora_runs["A"]), str(merged_dir), "--quiet"]) == 0
    ids = _ids(128, (2, 20), 3)
    meta, adapters = ft.load_finetuned(lora_runs["A"])
    base = neox_jax.load(lora_runs["ckpt"])
    unmerged = jax.jit(lambda p, i: forward(base.config, p, i, lora=ft.mode_from_meta(meta))[0])(
        ft.merge_params(adapters, base.params), ids
    )
    merged = neox_jax.load(merged_dir).logits(ids)
    np.testing.assert_allclose(merged, np.asarray(unmerged), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged, neox_jax.load(lora_runs["ckpt"], finetuned=lora_runs["A"]).logits(ids))


@pytest.mark.parametrize(
    "command", [["generate", "--max-new-tokens", "2"], ["evaluate", "--tasks", "piqa"], ["serve", "--port", "1"]]
)
def test_commands_take_adapter(tiny_ckpt, tmp_path, capsys, command):
    """generate / evaluate / serve --adapter DIR reach neox_jax.load(adapter=DIR): a directory without an adapter is
    named (before anything listens or compiles)."""
    _, ckpt = tiny_ckpt
    assert cli([command[0], "--checkpoint", str(ckpt), "--adapter", str(tmp_path / "none"), *command[1:]]) == 1
    assert f"{tmp_path / 'none'}: no adapter_config.json" in capsys.readouterr().err
