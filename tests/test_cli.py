"""The `neox-jax` command: every subcommand registered and documented, the converters loaded under a name a user's
own convert.py cannot shadow, lm-eval's flag spellings, and the API's string shorthands (dtype aliases, mesh specs)."""

from __future__ import annotations

import json
import os
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


def test_benchmark_lists_and_names_an_unknown_one(capsys):
    assert main(["benchmark"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("available: ") and "int8" in listed and "_common" not in listed
    assert main(["benchmark", "int9"]) == 1
    assert "unknown benchmark 'int9'; available: " in capsys.readouterr().err


BLOCK_REFERENCE = """import sys
class Block:  # torch / transformers absent, as in a plain `pip install neox-jax`
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
"""


def test_benchmark_runs_from_an_installed_wheel(tmp_path):
    """`pip wheel` of the project, installed with --target outside the checkout, run from another folder with torch
    and transformers hidden: `neox-jax benchmark --help` and the quickest benchmark (int8 --quick) work from the
    wheel's own files, the neox-jax side alone, with one line saying the reference was skipped."""
    import shutil
    import subprocess

    src, site, cwd = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("neox_jax", "convert"):  # a copy: building in the checkout would leave build/ and egg-info there
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path, src], check=True, timeout=300)
    (wheel,) = tmp_path.glob("neox_jax-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True, timeout=300)
    (cwd / "block").mkdir(parents=True)
    (cwd / "block" / "sitecustomize.py").write_text(BLOCK_REFERENCE)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{cwd / 'block'}", "JAX_PLATFORMS": "cpu"}

    def neox_jax(*args):
        r = subprocess.run(
            [site / "bin" / "neox-jax", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    where = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('neox_jax').origin)"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.strip() == str(site / "neox_jax" / "__init__.py")  # the wheel's files, not the checkout's
    assert "int8 --quick" in neox_jax("benchmark", "--help")
    out = neox_jax("benchmark", "int8", "--quick", "--out", cwd / "out")
    skipped = [line for line in out.splitlines() if "skipped" in line]
    assert skipped == ["the PyTorch reference rows skipped: torch, transformers not importable "
                       "(pip install 'neox-jax[test]'); neox-jax only"], out  # fmt: skip
    rows = json.loads((cwd / "out" / "int8.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"jax"} and len(rows) == 2 and all(r["decode_ms_per_token"] > 0 for r in rows)


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
