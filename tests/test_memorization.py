"""`memorization` and `data-loss` against transformers on tiny GPT-NeoX models: a random one, and one trained here
for a few steps on four sequences (so some items are memorized and scores are neither all 0 nor all 1).

References: transformers' greedy `generate` called as EleutherAI's eval_memorization.py calls it (min_length =
max_length = k + n, which keeps the end-of-text id out), a plain argmax loop over transformers' logits (--allow-eos),
and transformers' per-sequence mean loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hub_stub import HubStub

from conftest import convert_hf, make_hf_model

K, N, VOCAB = 32, 32, 128
REPO = "EleutherAI/pythia-memtiny"


def hf_generate(model, contexts: np.ndarray, n: int) -> np.ndarray:
    """transformers' greedy generate, the EleutherAI call: the end-of-text id is never chosen."""
    import torch

    ids = torch.tensor(contexts)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_length=ids.shape[1] + n,
            min_length=ids.shape[1] + n,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].numpy()


def hf_argmax_loop(model, contexts: np.ndarray, n: int) -> np.ndarray:
    """Plain greedy: n times, append argmax of transformers' last logits (every id allowed)."""
    import torch

    ids = torch.tensor(contexts)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, contexts.shape[1] :].numpy()


def hf_scores(model, items: np.ndarray, allow_eos=False) -> list[float]:
    made = (hf_argmax_loop if allow_eos else hf_generate)(model, items[:, :K], N)
    return (made == items[:, K : K + N]).mean(1).tolist()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one torch thread is many times faster than two on a shared machine (and leaves JAX a core)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(hf model, its directory, checkpoint, training sequences [4, 64]): 40 Adam steps on four sequences, one with
    the end-of-text id (0) twice in its continuation."""
    import torch

    model = make_hf_model(seed=3)
    train = np.random.default_rng(1).integers(1, VOCAB, (4, K + N))
    train[0, K + 8] = train[0, K + 18] = 0
    x = torch.tensor(train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    d = tmp_path_factory.mktemp("trained")
    model.save_pretrained(d / "hf")
    convert_hf(d / "hf", d / "ckpt")
    return model, d / "hf", d / "ckpt", train


def items_for(model, seed=0) -> np.ndarray:
    """8 items [8, K + N] whose scores under `model` are 1, 31/32, ..., 25/32 by construction: a random context, then
    transformers' greedy continuation with its last j tokens changed (the tokens before them, and so the greedy
    path, unchanged)."""
    ctx = np.random.default_rng(seed).integers(0, VOCAB, (8, K))
    cont = hf_generate(model, ctx, N)
    for j in range(8):
        cont[j, N - j :] = (cont[j, N - j :] + 1) % VOCAB  # the last j: earlier tokens (and the path) unchanged
    return np.concatenate([ctx, cont], axis=1)


def memorize(ckpt, out, data, batch=4, **kw):
    from neox_jax.sweep.memorization import MemorizationConfig, run_memorization

    cfg = MemorizationConfig(
        model=str(ckpt), revisions=kw.pop("revisions", None), data="", items=range(len(data)), output=str(out), **kw
    )
    return run_memorization(dataclass_replace(cfg, batch=batch), dataset=list(data), log=lambda *a: None)


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_scores_equal_transformers_generate_on_a_random_model(tiny_ckpt, tmp_path):
    hf, ckpt = tiny_ckpt
    data = items_for(hf)
    want = [1 - j / N for j in range(8)]  # transformers' scores, by construction
    res = memorize(ckpt, tmp_path / "out", data, batch=4)
    assert [r["score"] for r in res["rows"]] == want
    assert [r["item"] for r in res["rows"]] == list(range(8))
    assert res["compiles"] == 2  # one prefill and one decode program for both batches
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary[0]["memorized"] == 1 and summary[0]["memorized_fraction"] == 1 / 8
    csv = (tmp_path / "out" / "memorized-evals" / f"{ckpt.name}.csv").read_text().splitlines()
    assert csv[0] == "index,score" and csv[1] == "0,1.0" and len(csv) == 9


def test_scores_equal_transformers_on_a_trained_model(trained, tmp_path):
    hf, _, ckpt, train = trained
    data = np.concatenate([train, np.random.default_rng(5).integers(0, VOCAB, (3, K + N))])  # 4 seen, 3 not
    want = hf_scores(hf, data)
    plain = hf_scores(hf, data, allow_eos=True)
    assert want[1:4] == [1.0, 1.0, 1.0] and max(want[4:]) < 0.5  # memorized / not: the study sees a difference
    assert plain[0] == 1.0 > want[0]  # item 0 needs the end-of-text id, which EleutherAI's call never makes
    got = memorize(ckpt, tmp_path / "eos-suppressed", data, batch=4)
    assert [r["score"] for r in got["rows"]] == want
    got = memorize(ckpt, tmp_path / "plain", data, batch=4, allow_eos=True)
    assert [r["score"] for r in got["rows"]] == plain
    assert got["summary"][0]["memorized"] == 4


@pytest.fixture
def stub(tiny_ckpt, trained, tmp_path, monkeypatch):
    """The random model as step0 and the trained one as step1000 of a loopback Hub repo."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("NEOX_JAX_CACHE", str(tmp_path / "neox"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    random_dir = tmp_path / "random"
    tiny_ckpt[0].save_pretrained(random_dir)
    with HubStub({REPO: {"step0": random_dir, "step1000": trained[1]}}) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        yield s


@pytest.mark.filterwarnings("ignore:.*no tokenizer.json")
def test_killed_and_rerun_redoes_only_missing_pairs(stub, trained, tmp_path, monkeypatch):
    from neox_jax.sweep.memorization import MemorizationStudy

    data = np.concatenate([trained[3], np.random.default_rng(5).integers(0, VOCAB, (4, K + N))])  # 8 items
    out = tmp_path / "out"
    scored = []  # (revision's params id, items per call) as the study sees them
    real = MemorizationStudy.values

    def counting(self, seqs):
        scored.append(len(seqs))
        return real(self, seqs)

    monkeypatch.setattr(MemorizationStudy, "values", counting)
    full = memorize(REPO, out, data, revisions=["step0", "step1000"])
    assert len(scored) == 4 and full["compiles"] == 2  # 2 revisions x 2 batches; compiled once for both
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["revision"], r["step"], r["item"]) for r in rows] == [
        (rev, step, i) for rev, step in (("step0", 0), ("step1000", 1000)) for i in range(8)
    ]
    assert [r["score"] for r in rows[8:]] == hf_scores(trained[0], data)  # the trained revision, via the Hub

    # killed during the third batch's write: 10 whole rows and a torn line
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:10]) + lines[10][:17])
    scored.clear()
    again = memorize(REPO, out, data, revisions=["step0", "step1000"])
    assert again["scored"] == 6 and again["skipped"] == 10
    assert len(scored) == 2  # step1000's items 2..7: one batch of 4, one of 2 (filled to 4); step0 untouched
    assert (out / "results.jsonl").read_text() == "".join(lines[:10]) + "".join(lines[10:])
    assert again["rows"] == full["rows"] and again["summary"] == full["summary"]

    # nothing missing: nothing loaded or scored
    import neox_jax

    monkeypatch.setattr(neox_jax, "load", lambda *a, **k: pytest.fail("loaded a revision with nothing to do"))
    scored.clear()
    assert memorize(REPO, out, data, revisions=["step0", "step1000"])["scored"] == 0 and not scored
    png = out / "memorization.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_named_errors(tiny_ckpt, tmp_path):
    from neox_jax.errors import NeoXError
    from neox_jax.sweep.resume import parse_items

    _, ckpt = tiny_ckpt
    with pytest.raises(NeoXError, match=r"item 1: \(40,\) tokens, expected at least 64"):
        memorize(ckpt, tmp_path / "short", [np.zeros(64, int), np.zeros(40, int)])
    with pytest.raises(NeoXError, match="other settings"):
        memorize(ckpt, tmp_path / "short", [np.zeros(64, int)], context=16)
    with pytest.raises(NeoXError, match="exceeds the model's max_position_embeddings 128"):
        memorize(ckpt, tmp_path / "long", [np.zeros(200, int)], context=100)
    with pytest.raises(NeoXError, match="the dataset has 10 items"):
        parse_items("0:11", 10)
    with pytest.raises(NeoXError, match="START:STOP"):
        parse_items("5", 10)


def test_data_loss_equals_transformers_per_sequence_loss(tiny_ckpt, tmp_path):
    import torch

    from neox_jax.sweep.data_loss import DataLossConfig, run_data_loss

    hf, ckpt = tiny_ckpt
    rng = np.random.default_rng(2)
    data = [rng.integers(0, VOCAB, n) for n in (129, 64, 129, 17, 100)]  # 129: max_position_embeddings + 1
    with torch.no_grad():
        want = [hf(torch.tensor(s[None]), labels=torch.tensor(s[None])).loss.item() for s in data]
    cfg = DataLossConfig(
        model=str(ckpt),
        revisions=None,
        data="",
        items=[0, 1, 2, 3, 4],
        output=str(tmp_path / "loss"),
        data_steps={0: 7, 1: 7, 2: 8, 3: 8, 4: 8},
        batch=2,
    )
    res = run_data_loss(cfg, dataset=data, log=lambda *a: None)
    got = [r["loss"] for r in res["rows"]]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert [r["data_step"] for r in res["rows"]] == [7, 7, 8, 8, 8]
    assert [(s["data_step"], s["items"]) for s in res["summary"]] == [(7, 2), (8, 3)]
    assert res["summary"][1]["mean_loss"] == pytest.approx(np.mean(want[2:]), abs=1e-5)
    with pytest.raises(Exception, match="sequence 0 has 130 tokens"):
        run_data_loss(dataclass_replace(cfg, output=str(tmp_path / "x")), dataset=[np.zeros(130, int)] * 5)


def test_commands_on_a_megatron_dataset(trained, tmp_path, capsys):
    import torch

    from neox_jax.cli import main
    from neox_jax.data import write_indexed

    hf, _, ckpt, train = trained
    data = np.concatenate([train, np.random.default_rng(6).integers(0, VOCAB, (4, K + N))])  # steps 0 and 1 at 4/step
    prefix = tmp_path / "ds"
    write_indexed(prefix, list(data), np.uint16)
    common = ["--model", str(ckpt), "--data", str(prefix), "--batch", "4"]
    out = tmp_path / "mem"
    assert main(["memorization", *common, "--items", "0:8", "--output", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == hf_scores(hf, data)
    assert main(["memorization", *common, "--items", "0:9", "--output", str(out)]) == 1
    assert "--items '0:9': the dataset has 8 items" in capsys.readouterr().err

    out = tmp_path / "loss"
    assert main(["data-loss", *common, "--steps", "1,0", "--step-batch", "4", "--output", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["item"], r["data_step"]) for r in rows) == [(i, i // 4) for i in range(8)]
    with torch.no_grad():
        want = {i: hf(torch.tensor(x[None]), labels=torch.tensor(x[None])).loss.item() for i, x in enumerate(data)}
    for r in rows:
        assert r["loss"] == pytest.approx(want[r["item"]], abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    trained_batch, other = (next(s for s in summary if s["data_step"] == d) for d in (0, 1))
    assert trained_batch["mean_loss"] < 0.5 < other["mean_loss"]  # the batch it trained on, and one it never saw


def test_on_a_mesh_the_same_scores_and_losses(tiny_ckpt, tmp_path):
    import jax
    import torch

    from neox_jax.sweep.data_loss import DataLossConfig, run_data_loss

    if jax.device_count() != 8:
        pytest.skip(f"needs 8 devices, found {jax.device_count()}: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    hf, ckpt = tiny_ckpt
    data = items_for(hf)
    res = memorize(ckpt, tmp_path / "mem", data, batch=4, mesh="data=4,model=2")
    assert [r["score"] for r in res["rows"]] == [1 - j / N for j in range(8)] and res["compiles"] == 2
    cfg = DataLossConfig(str(ckpt), None, "", range(8), str(tmp_path / "loss"), batch=4, mesh="data=4,model=2")
    sharded = [r["loss"] for r in run_data_loss(cfg, dataset=list(data), log=lambda *a: None)["rows"]]
    with torch.no_grad():
        want = [hf(torch.tensor(x[None]), labels=torch.tensor(x[None])).loss.item() for x in data]
    np.testing.assert_allclose(sharded, want, rtol=0, atol=1e-5)
