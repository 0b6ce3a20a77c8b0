"""The `neox-jax` command: every subcommand registered and documented, the converters loaded under a name a user's
own convert.py cannot shadow, lm-eval's flag spellings, and the API's string shorthands (dtype aliases, mesh specs)."""

from __future__ import annotations

import sys
import tomllib

import pytest

from conftest import ROOT
from neox_jax.cli import COMMANDS, build_parser, main


def test_every_subpackage_ships_in_the_wheel():
    """pyproject lists packages by hand (convert/ installs as neox_jax_convert): a new subpackage must be listed."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "neox_jax").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
    assert "neox_jax_convert" in listed


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    for name in COMMANDS:  # each subcommand builds its flags and has a description
        assert build_parser(name)._subparsers._group_actions[0].choices[name].description


def test_stray_convert_py_is_never_imported(hf_tiny, tmp_path, monkeypatch, capsys):
    """A convert.py in the user's folder (first on sys.path) must not replace the converters. (The reference has no
    tokenizer.json: that is one `warning:` line.)"""
    _, src = hf_tiny
    stray = tmp_path / "cwd"
    stray.mkdir()
    (stray / "convert.py").write_text("raise RuntimeError('the stray convert.py was imported')\n")
    monkeypatch.syspath_prepend(str(stray))
    monkeypatch.chdir(stray)
    for name in [m for m in sys.modules if m == "convert" or m.startswith(("convert.", "neox_jax_convert"))]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["convert", "hf", str(src), str(tmp_path / "ckpt"), "--quiet"]) == 0
    assert "convert" not in sys.modules and (tmp_path / "ckpt" / "params").is_dir()
    warned = [line for line in capsys.readouterr().err.splitlines() if "no tokenizer.json" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ")


def test_evaluate_accepts_lm_eval_spellings():
    from neox_jax.cli.evaluate import _output_file

    a = build_parser("evaluate").parse_args(
        [
            "evaluate",
            "--pretrained",
            "ck",
            "--tasks",
            "piqa",
            "--batch_size",
            "auto",
            "--num_fewshot",
            "2",
            "--output_path",
            "out",
            "--log_samples",
            "--bootstrap_iters",
            "0",
        ]
    )
    assert (a.checkpoint, a.batch_size, a.num_fewshot, a.output, a.log_samples, a.bootstrap_iters) == (
        "ck",
        "auto",
        2,
        "out",
        True,
        0,
    )
    assert _output_file("out").name == "results.json" and _output_file("r.json").name == "r.json"


def test_benchmark_explains_a_missing_checkout(tmp_path, monkeypatch, capsys):
    from neox_jax.cli import benchmark

    monkeypatch.setattr(benchmark, "bench_dir", lambda: tmp_path / "scripts" / "bench")
    assert main(["benchmark", "generate"]) == 1
    assert "source" in capsys.readouterr().err


def test_load_accepts_dtype_aliases_and_mesh_strings(tiny_ckpt):
    import jax
    import jax.numpy as jnp

    import neox_jax

    _, ckpt = tiny_ckpt
    assert neox_jax.load(ckpt, dtype="bf16").dtype == jnp.bfloat16
    assert neox_jax.load(ckpt, dtype="fp16").dtype == jnp.float16
    with pytest.raises(neox_jax.errors.NeoXError, match="unsupported dtype 'fp8'"):
        neox_jax.load(ckpt, dtype="fp8")
    n = len(jax.devices())
    if n % 2 == 0:
        m = neox_jax.load(ckpt, mesh="data=-1,model=2")
        assert dict(m.mesh.shape) == {"data": n // 2, "model": 2}
