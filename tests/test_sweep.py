"""`neox-jax sweep` against the loopback Hub stand-in: three revisions of a tiny GPT-NeoX with the real tokenizer,
the third a byte-identical copy of the second, evaluated on a few LAMBADA documents from the local data."""

from __future__ import annotations

import json
import shutil

import pytest
from hub_stub import HubStub

from conftest import SHARED_DATA, make_hf_model

pytest.importorskip("lm_eval")
REPO = "EleutherAI/pythia-sweeptiny"
ARGS = ["--tasks", "lambada_openai", "--limit", "6", "--bootstrap-iters", "10", "--batch-size", "4"]


@pytest.fixture(scope="module")
def revision_dirs(tmp_path_factory, tokenizer_file):
    if not (SHARED_DATA / "lambada_openai").is_dir():
        pytest.skip(f"reference data absent: {SHARED_DATA}")
    import torch

    dirs = {}
    for seed, rev in ((1, "step0"), (2, "step1000")):
        model = make_hf_model(
            seed=seed,
            vocab_size=50304,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        )
        with torch.no_grad():
            model.get_output_embeddings().weight[50277:] = 0
        d = tmp_path_factory.mktemp(rev)
        model.save_pretrained(d)
        shutil.copyfile(tokenizer_file, d / "tokenizer.json")
        dirs[rev] = d
    # step3000: step1000's weights again, but as pytorch_model.bin (another file layout: only tensor hashes match)
    dirs["step3000"] = tmp_path_factory.mktemp("step3000")
    torch.save(model.state_dict(), dirs["step3000"] / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(dirs["step1000"] / name, dirs["step3000"] / name)
    dirs["step2000"] = tmp_path_factory.mktemp("step2000")  # the bug of pythia #195: another step's weights
    for f in dirs["step1000"].iterdir():
        shutil.copyfile(f, dirs["step2000"] / f.name)
    return dirs


@pytest.fixture
def stub(revision_dirs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("NEOX_JAX_CACHE", str(tmp_path / "neox"))
    monkeypatch.setenv("NEOX_JAX_DATA_DIR", str(SHARED_DATA))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStub({REPO: revision_dirs}) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        yield s


def sweep(out, *extra):
    from neox_jax.cli import main

    return main(["sweep", "--model", REPO, "--output", str(out), *ARGS, *extra])


def rows_of(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def standalone(hf_dir, tmp_path):
    """The same revision converted from its local files and evaluated alone, as scripts/evaluate.py does."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from neox_jax.evaluation.harness import NeoXLM
    from neox_jax.evaluation.tasks import task_specs
    from neox_jax.store import converters

    ckpt = tmp_path / f"standalone-{hf_dir.name}"
    converters.module("hub").convert_source(hf_dir, ckpt, progress=False)
    res = simple_evaluate(
        model=NeoXLM(pretrained=str(ckpt), batch_size=4),
        tasks=list(task_specs(["lambada_openai"]).values()),
        limit=6,
        bootstrap_iters=10,
        task_manager=TaskManager(include_defaults=False),
        log_samples=False,
    )
    return res["results"]["lambada_openai"]


def test_sweep_rows_duplicates_plot_and_resume(stub, revision_dirs, tmp_path, monkeypatch):
    import gc
    import weakref

    import neox_jax

    loaded, alive_at_load, real_load = [], [], neox_jax.load

    def counting_load(*a, **k):  # how many revisions' weights are alive each time another is loaded
        gc.collect()
        m = real_load(*a, **k)
        loaded.append(weakref.ref(m))
        alive_at_load.append(sum(r() is not None for r in loaded))
        return m

    monkeypatch.setattr(neox_jax, "load", counting_load)
    out = tmp_path / "out"
    assert sweep(out, "--revisions", "step0,step1000,step2000") == 0
    assert len(alive_at_load) == 3 and max(alive_at_load) <= 2, alive_at_load
    monkeypatch.setattr(neox_jax, "load", real_load)
    rows = rows_of(out)
    assert [(r["revision"], r["step"], r["task"]) for r in rows] == [
        ("step0", 0, "lambada_openai"),
        ("step1000", 1000, "lambada_openai"),
        ("step2000", 2000, "lambada_openai"),
    ]
    assert set(rows[0]) == {"revision", "step", "commit", "task", "metrics", "fingerprint", "duplicate_of", "seconds"}
    assert [r["commit"] for r in rows] == [stub.commit(REPO, r["revision"]) for r in rows]
    assert [r["duplicate_of"] for r in rows] == [None, None, "step1000"]
    assert rows[1]["fingerprint"] == rows[2]["fingerprint"] != rows[0]["fingerprint"]
    for r in rows[:2]:  # each revision's metrics are those of a standalone evaluation of that revision
        want = standalone(revision_dirs[r["revision"]], tmp_path)
        assert r["metrics"]["acc,none"] == want["acc,none"]
        assert r["metrics"]["perplexity,none"] == pytest.approx(want["perplexity,none"], rel=1e-6)
    assert (
        rows[0]["metrics"]["acc,none"] != rows[1]["metrics"]["acc,none"]
        or rows[0]["metrics"]["perplexity,none"] != rows[1]["metrics"]["perplexity,none"]
    )
    assert rows[2]["metrics"] == rows[1]["metrics"]
    png = out / "lambada_openai.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    summary = (out / "summary.md").read_text()
    assert "**step2000** serves weights bit-identical to **step1000**" in summary

    # rerun: nothing evaluated again, nothing downloaded again; a torn last line (a killed write) is tolerated
    with open(out / "results.jsonl", "a") as fh:
        fh.write('{"revision": "step4000", "st')
    n = len(stub.requests)
    assert sweep(out, "--revisions", "step0,step1000,step2000") == 0
    assert rows_of(out) == rows
    assert not any("/resolve/" in r for r in stub.requests[n:])  # only the three revision -> commit requests
    # a sweep killed after two pairs: the rerun evaluates only the missing one
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert sweep(out, "--revisions", "step0,step1000,step2000") == 0
    again = rows_of(out)
    assert len(again) == 3 and again[2]["metrics"] == rows[2]["metrics"] and again[2]["duplicate_of"] == "step1000"


def test_skip_duplicates_and_named_errors(stub, tmp_path, capsys):
    out = tmp_path / "out"
    assert sweep(out, "--revisions", "step1000,step2000", "--skip-duplicates") == 0
    rows = rows_of(out)
    assert rows[1]["duplicate_of"] == "step1000" and rows[1]["metrics"] is None
    assert not any(f"/{stub.commit(REPO, 'step2000')}/model.safetensors" in r for r in stub.requests)  # not fetched
    # the same weights in another file layout: found by the converted tensors' hashes
    out2 = tmp_path / "layouts"
    assert sweep(out2, "--revisions", "step0,step1000,step3000", "--skip-duplicates") == 0
    rows = rows_of(out2)
    assert [r["duplicate_of"] for r in rows] == [None, None, "step1000"] and rows[2]["metrics"] is None
    assert rows[1]["fingerprint"] == rows[2]["fingerprint"] != rows[0]["fingerprint"]
    assert sweep(tmp_path / "o2", "--revisions", "step0,step1234") == 1
    assert "no revision 'step1234'; nearest published steps: step1000, step2000" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "results.jsonl").exists()
    assert sweep(out, "--revisions", "step0", "--limit", "3") == 1  # other settings than the rows already there
    assert "holds a sweep with other settings (limit: 6.0 there, 3.0 now)" in capsys.readouterr().err


def test_revision_lists():
    from neox_jax.errors import NeoXError
    from neox_jax.sweep.run import revisions_from

    assert revisions_from(steps="0:30000:10000") == ["step0", "step10000", "step20000", "step30000"]
    log = revisions_from(pythia="log")
    assert log[:11] == [f"step{2**i}" if i >= 0 else "step0" for i in range(-1, 10)]
    assert log[-1] == "step143000" and "step1000" in log and "step128000" in log and len(log) == len(set(log))
    assert len(revisions_from(pythia="all")) == 154
    assert revisions_from(revisions="main, step3") == ["main", "step3"]
    for bad in ({"steps": "0:10"}, {"revisions": "a,a"}, {"revisions": "a", "steps": "0:1:1"}):
        with pytest.raises(NeoXError):
            revisions_from(**bad)
