"""Bad input to `neox-jax convert hf`: a one-line error naming the file and tensor, non-zero exit, no output. Run in
process (neox_jax.cli.main); test_help_explains runs the command itself."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_model, run_cli
from neox_jax.cli import main


@pytest.fixture()
def hf_dir(tmp_path):
    make_hf_model(seed=7).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _edit_tensors(d, fn):
    f = d / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _convert(*args) -> int:
    return main(["convert", "hf", *map(str, args), "--quiet"])


def _convert_fails(capsys, src, out, *must_contain):
    capsys.readouterr()
    assert _convert(src, out) == 1
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: "), stderr
    for s in must_contain:
        assert s in err[-1], (s, err[-1])
    assert not out.exists()
    assert not list(out.parent.glob(out.name + ".tmp*")), "temporary directory left behind"
    return err[-1]


def test_missing_tensor(hf_dir, tmp_path, capsys):
    _edit_tensors(hf_dir, lambda t: t.pop("gpt_neox.layers.1.mlp.dense_h_to_4h.bias"))
    _convert_fails(
        capsys, hf_dir, tmp_path / "out", "missing tensors", "gpt_neox.layers.1.mlp.dense_h_to_4h.bias", str(hf_dir)
    )


def test_extra_tensor(hf_dir, tmp_path, capsys):
    _edit_tensors(hf_dir, lambda t: t.update({"gpt_neox.layers.9.mystery.weight": torch.zeros(3)}))
    _convert_fails(capsys, hf_dir, tmp_path / "out", "unexpected tensors", "gpt_neox.layers.9.mystery.weight")


def test_wrong_shape(hf_dir, tmp_path, capsys):
    _edit_tensors(hf_dir, lambda t: t.update({"gpt_neox.layers.0.attention.dense.weight": torch.zeros(64, 32)}))
    _convert_fails(
        capsys,
        hf_dir,
        tmp_path / "out",
        "model.safetensors",
        "gpt_neox.layers.0.attention.dense.weight",
        "expected shape [64, 64]",
        "found [64, 32]",
    )


def test_truncated_safetensors(hf_dir, tmp_path, capsys):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _convert_fails(capsys, hf_dir, tmp_path / "out", "model.safetensors", "truncated")


def test_not_gpt_neox_config(hf_dir, tmp_path, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _convert_fails(capsys, hf_dir, tmp_path / "out", "config.json", "gpt_neox", "llama")


def test_nonfinite_weights_refused(hf_dir, tmp_path, capsys):
    def poison(t):
        t["gpt_neox.layers.0.mlp.dense_4h_to_h.bias"][3] = float("nan")

    _edit_tensors(hf_dir, poison)
    _convert_fails(capsys, hf_dir, tmp_path / "out", "gpt_neox.layers.0.mlp.dense_4h_to_h.bias", "NaN/Inf")
    assert _convert(hf_dir, tmp_path / "kept", "--allow-nonfinite") == 0
    assert (tmp_path / "kept" / "metadata.json").is_file()


def test_existing_output_is_not_overwritten(hf_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert _convert(hf_dir, tmp_path / "out") == 1
    assert "already exists" in capsys.readouterr().err


def test_help_explains():  # the command itself, in a fresh process
    r = run_cli("-m", "neox_jax", "convert", "hf", "--help")
    assert "save_pretrained" in r.stdout and "--dtype" in r.stdout
