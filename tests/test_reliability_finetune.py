"""Fine-tune resume faults: another base checkpoint, a changed step count, a torn metrics line; a refused resume
changes no file (docs/reliability.md)."""

import json
import shutil

import numpy as np
import pytest

from conftest import micro_config, train_char_bpe
from neox_jax.errors import NeoXError
from neox_jax.model.neox import init_params
from neox_jax.store import checkpoint
from neox_jax.training import run as train

CFG = micro_config(vocab_size=128, num_hidden_layers=1, max_position_embeddings=64)
WORDS = ["the", "king", "queen", "lord", "speak", "hear", "love", "death", "night", "day", "sword", "crown"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny bases with a 128-id character BPE, a text file, and a 2-step run on base A saved at every step."""

    d = tmp_path_factory.mktemp("ft")
    rng = np.random.RandomState(0)
    text = "\n".join(" ".join(rng.choice(WORDS, 6)) + "." for _ in range(400))
    (d / "train.txt").write_text(text)
    train_char_bpe(d / "tokenizer.json", [text])
    for name, seed in (("baseA", 0), ("baseB", 1)):
        checkpoint.save_params(d / name, CFG, init_params(CFG, seed=seed), tokenizer_file=d / "tokenizer.json")
    assert train.run(_cfg(d, "run")) == 0
    return d


def _cfg(d, run, **kw):
    base = {
        "checkpoint": str(d / "baseA"),
        "data": [str(d / "train.txt")],
        "out": str(d / run),
        "seq_len": 16,
        "batch_size": 8,
        "steps": 2,
        "lr": 1e-3,
        "mesh": "data=-1",
        "save_every": 1,
        "progress": False,
    }
    return train.RunConfig(**{**base, **kw})


def _run_copy(setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup / "run", run)
    return run


def _files(run):
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_run_records_the_base_identity_and_schedule(setup):
    saved = json.loads((setup / "run" / "run.json").read_text())
    assert saved["base"] == checkpoint.identity(setup / "baseA") != checkpoint.identity(setup / "baseB")
    assert saved["total_steps"] == 2


def test_resume_on_another_base_is_refused_and_changes_nothing(setup, tmp_path):
    run = _run_copy(setup, tmp_path)
    before = _files(run)
    with pytest.raises(
        NeoXError,
        match=r"run\.json: --resume with --checkpoint .*baseB, but the run started from "
        r".*baseA, whose stored bytes differ",
    ):
        train.run(_cfg(setup, run, checkpoint=str(setup / "baseB"), resume=True))
    assert _files(run) == before


def test_resume_failing_after_the_run_json_checks_changes_nothing(setup, tmp_path):
    """A resume that fails later (here: its data file is gone) leaves run.json and metrics.jsonl as they were."""
    run = _run_copy(setup, tmp_path)
    before = _files(run)
    with pytest.raises(NeoXError):
        train.run(
            _cfg(
                setup,
                run,
                resume=True,
                steps=3,
                allow_schedule_change=True,
                data=[str(tmp_path / "gone.txt")],
                tokenizer=str(setup / "tokenizer.json"),
            )
        )
    assert _files(run) == before


def test_changing_steps_on_resume_needs_allow_schedule_change(setup, tmp_path):
    run = _run_copy(setup, tmp_path)
    before = _files(run)
    with pytest.raises(NeoXError, match=r"schedule spans 2 steps, this resume asks for 3.*--allow-schedule-change"):
        train.run(_cfg(setup, run, steps=3, resume=True))
    assert _files(run) == before
    assert train.run(_cfg(setup, run, steps=3, resume=True, allow_schedule_change=True)) == 0
    assert json.loads((run / "run.json").read_text())["total_steps"] == 3
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_torn_last_metrics_line_is_dropped_with_a_warning(setup, tmp_path, capsys):
    run = _run_copy(setup, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 0, "lo')  # killed mid-write
    assert train.run(_cfg(setup, run, steps=3, resume=True, allow_schedule_change=True)) == 0
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


def test_bad_line_before_the_end_is_an_error_naming_it(setup, tmp_path):
    run = _run_copy(setup, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(NeoXError, match=r"metrics\.jsonl:1: not valid JSON"):
        train.run(_cfg(setup, run, resume=True))


def test_finetuned_params_record_checksums(setup, tmp_path):
    run = _run_copy(setup, tmp_path)
    assert checkpoint.verify(run / "finetuned") > 0
    f = max((p for p in (run / "finetuned" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    with pytest.raises(checkpoint.ChecksumError, match="sha256 differs"):
        checkpoint.verify(run / "finetuned")
