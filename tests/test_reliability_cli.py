"""Generate / evaluate faults through the `neox-jax` command, in-process: each ends in one line on stderr and exit 1
before any work starts; --debug shows the traceback (docs/reliability.md)."""

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import micro_config
from neox_jax.cli import main
from neox_jax.errors import NeoXError
from neox_jax.inference.sampling import SamplingParams
from neox_jax.model.neox import init_params
from neox_jax.store import checkpoint, records

CFG = micro_config(num_hidden_layers=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoint.save_params(tmp_path_factory.mktemp("cli") / "tiny", CFG, init_params(CFG))


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# ---- generate --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1e-45, 1e-30, 5e-5])
def test_tiny_temperature_is_refused_with_the_valid_range(t):
    with pytest.raises(NeoXError, match=r"temperature .* too small .* use 0 \(greedy.* >= 0\.0001"):
        SamplingParams(temperature=t)


def test_smallest_allowed_temperature_samples_finite_ids():
    """At the bound the scaled logits stay finite: sampling returns the greedy id, not garbage."""
    import jax
    import jax.numpy as jnp

    from neox_jax.inference.sampling import choose

    sp = SamplingParams(temperature=1e-4, seed=1)
    logits = jnp.asarray(np.random.RandomState(0).randn(4, 50) * 30, jnp.float32)
    ids = choose(sp.static(50), sp.values(), logits, jax.random.key(sp.seed))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(jnp.argmax(logits, -1)))


@pytest.mark.parametrize("seed", [2**70, 2**63, -1, 1.5, "3", True])
def test_seed_outside_int64_or_not_an_int_is_refused(seed):
    with pytest.raises(NeoXError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        SamplingParams(seed=seed)


def test_seed_accepts_numpy_ints_and_the_largest_int64():
    assert SamplingParams(seed=np.int64(7)).seed == 7 and type(SamplingParams(seed=np.int64(7)).seed) is int
    SamplingParams(seed=2**63 - 1)


def test_generate_empty_prompt_file(ckpt, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n   \n")
    err = _one_line_error(capsys, ["generate", "--checkpoint", str(ckpt), "--prompt-file", str(tmp_path / "p.txt")])
    assert "--prompt-file" in err and "holds no prompt" in err


def test_generate_missing_prompt_file(ckpt, tmp_path, capsys):
    err = _one_line_error(capsys, ["generate", "--checkpoint", str(ckpt), "--prompt-file", str(tmp_path / "no.txt")])
    assert "--prompt-file" in err and "no such file" in err


def test_generate_bad_checkpoint_path(tmp_path, capsys):
    err = _one_line_error(capsys, ["generate", "--checkpoint", str(tmp_path / "nope")])
    assert "nope: no such checkpoint directory" in err


def test_generate_checks_sampling_before_loading(tmp_path, capsys):
    """A bad --seed is named even with a checkpoint that would fail to load: the settings are checked first."""
    err = _one_line_error(capsys, ["generate", "--checkpoint", str(tmp_path / "nope"), "--seed", str(2**70)])
    assert "seed must be an int" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["generate", "--debug", "--checkpoint", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


# ---- evaluate --------------------------------------------------------------------------------------------------------


def _evaluate(ckpt, *extra):
    return ["evaluate", "--checkpoint", str(ckpt), "--tasks", "lambada_openai", *map(str, extra)]


def test_evaluate_missing_data_dir_is_named_at_once(ckpt, tmp_path, capsys):
    err = _one_line_error(capsys, _evaluate(ckpt, "--data-dir", tmp_path / "typo"))
    assert f"--data-dir {tmp_path / 'typo'}: no such directory" in err


def test_evaluate_offline_task_needing_the_hub_is_named_at_once(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    err = _one_line_error(capsys, _evaluate(ckpt, "--data-dir", tmp_path))  # an empty data dir: not local
    assert "lambada_openai would download data from the Hugging Face Hub, but HF_HUB_OFFLINE is set" in err
    assert f"not found under {tmp_path}" in err


def test_offline_check_accepts_cached_and_local_tasks(tmp_path, monkeypatch):
    from neox_jax.evaluation.tasks import check_offline

    tm = SimpleNamespace(task_index={"piqa": SimpleNamespace(cfg={"dataset_path": "org/data"})})
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    check_offline({"lambada_openai": "/some/local/lambada_openai.yaml"})  # local: fine
    with pytest.raises(NeoXError, match="piqa would download"):
        check_offline({"piqa": "piqa"}, task_manager=tm)
    (tmp_path / "datasets--org--data").mkdir()
    check_offline({"piqa": "piqa"}, task_manager=tm)  # in the Hugging Face cache: fine
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    check_offline({"mmlu": "mmlu"})  # online: lm-eval downloads as usual


def test_offline_check_refuses_only_what_it_can_show_is_remote(tmp_path, monkeypatch):
    """A packaged builder over local files, a local folder, a group or a custom loader is not the Hub: lm-eval reads
    them offline (or says why); a Hub dataset in datasets' own cache is readable offline too."""
    from neox_jax.evaluation.tasks import check_offline

    cfgs = {
        "mine": {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "x.jsonl")}}},
        "folder": {"dataset_path": str(tmp_path)},
        "group": {"group": "g", "task": ["mine"]},
        "custom": {"dataset_path": "org/other", "custom_dataset": "!function data.load"},
        "prepared": {"dataset_path": "org/prepared"},
        "remote": {"dataset_path": "org/remote"},
    }
    tm = SimpleNamespace(task_index={n: SimpleNamespace(cfg=c) for n, c in cfgs.items()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    (tmp_path / "datasets" / "org___prepared").mkdir(parents=True)
    check_offline({n: n for n in cfgs if n != "remote"}, task_manager=tm)
    with pytest.raises(NeoXError, match="task[(]s[)] remote would download"):
        check_offline({n: n for n in cfgs}, task_manager=tm)


@pytest.mark.parametrize("kind", ["directory", "under a file"])
def test_evaluate_unwritable_output_fails_before_evaluating(ckpt, tmp_path, capsys, kind):
    if kind == "directory":
        (tmp_path / "r.json").mkdir()
        output = tmp_path / "r.json"
    else:
        (tmp_path / "file").write_text("x")
        output = tmp_path / "file" / "r.json"
    err = _one_line_error(capsys, _evaluate(ckpt, "--output", output, "--data-dir", tmp_path))
    assert f"--output {output}" in err
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*probe*"))


def test_evaluate_bad_checkpoint_path(tmp_path, capsys):
    err = _one_line_error(capsys, _evaluate(tmp_path / "nope"))
    assert "nope: no such checkpoint directory" in err


def test_failed_write_leaves_no_tmp(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pathlib.Path.replace", full)
    with pytest.raises(NeoXError, match=r"r\.json: cannot write \(No space left on device\)"):
        records.write_json(tmp_path / "r.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []
