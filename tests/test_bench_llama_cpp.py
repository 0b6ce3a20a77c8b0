"""`benchmark decode`'s llama.cpp rows (neox_jax/bench/llama_cpp.py) without llama.cpp: finding it (or saying why
not), reading llama-bench's JSON (fields as llama-bench writes them), and the whole path through a stand-in
checkout whose converter and llama-bench are small scripts that check their arguments."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from neox_jax.bench import llama_cpp
from neox_jax.model.config import preset

# llama-bench -o json, trimmed to the fields read (a real run's values; model_type is the converter's guess)
BENCH_JSON = [
    {"model_filename": "/t/model-f32.gguf", "model_type": "gptneox 70M (guessed) all F32", "n_prompt": 0,
     "n_gen": 32, "avg_ts": 178.99, "stddev_ts": 2.18},
    {"model_filename": "/t/model-q8_0.gguf", "model_type": "gptneox 70M (guessed) all F32", "n_prompt": 0,
     "n_gen": 32, "avg_ts": 486.24, "stddev_ts": 16.3},
    {"model_filename": "/t/model-q8_0.gguf", "model_type": "gptneox 70M Q8_0", "n_prompt": 512, "n_gen": 0,
     "avg_ts": 900.0, "stddev_ts": 1.0},
]  # fmt: skip


def test_parse_reads_generation_tests_and_the_type_from_the_file_name():
    rows = llama_cpp.parse(json.dumps(BENCH_JSON))
    assert rows == [
        {"type": "f32", "tokens/s": 178.99, "stddev": 2.18},
        {"type": "q8_0", "tokens/s": 486.24, "stddev": 16.3},
    ]  # the prompt-processing test is left out


def test_find_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "not on PATH" in llama_cpp.find(None)
    assert "no llama-bench under" in llama_cpp.find(str(tmp_path))
    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "build" / "bin" / "llama-bench").write_text("")
    assert "no convert_hf_to_gguf.py" in llama_cpp.find(str(tmp_path))


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_rows_convert_each_type_and_run_llama_bench_once(tmp_path, monkeypatch, capsys):
    """A stand-in checkout: the converter writes its --outfile after checking the model it was given (config with
    rotary_pct, the tokenizer), llama-bench answers one generation test per -m."""
    cfg = preset("tiny")
    root = tmp_path / "llama.cpp"
    (root / "build" / "bin").mkdir(parents=True)
    _script(
        root / "convert_hf_to_gguf.py",
        "import json, sys, transformers\n"
        "from pathlib import Path\n"
        "a = sys.argv[1:]\n"
        "hf = Path(a[0])\n"
        "assert (hf / 'tokenizer.json').is_file()\n"
        "conf = transformers.AutoConfig.from_pretrained(hf).to_dict()\n"
        f"assert conf['rotary_pct'] == {cfg.rotary_pct}, conf\n"  # what llama.cpp's GPT-NeoX converter reads
        "Path(a[a.index('--outfile') + 1]).write_text(a[a.index('--outtype') + 1])\n",
    )
    _script(
        root / "build" / "bin" / "llama-bench",
        "import json, sys\n"
        "a = sys.argv[1:]\n"
        "assert a[a.index('-p') + 1] == '0' and a[a.index('-o') + 1] == 'json'\n"
        "models = [a[i + 1] for i, x in enumerate(a) if x == '-m']\n"
        "assert [open(m).read() for m in models] == ['f32', 'f16', 'q8_0']\n"
        "n = int(a[a.index('-n') + 1])\n"
        "print(json.dumps([{'model_filename': m, 'model_type': 'x', 'n_prompt': 0, 'n_gen': n, 'avg_ts': 10.0 + i,"
        " 'stddev_ts': 0.5} for i, m in enumerate(models)]))\n",
    )
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    rows = llama_cpp.rows(cfg, 8, tok, str(root))
    assert [(r["engine"], r["tokens/s"]) for r in rows] == [
        ("llama.cpp f32", 10.0),
        ("llama.cpp f16", 11.0),
        ("llama.cpp q8_0", 12.0),
    ]
    assert llama_cpp.rows(cfg, 8, None, str(root)) == []
    assert "needs a tokenizer" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["path", "dir"])
def test_find_takes_path_or_a_checkout(tmp_path, monkeypatch, where):
    root = tmp_path / "llama.cpp"
    (root / "build" / "bin").mkdir(parents=True)
    _script(root / "build" / "bin" / "llama-bench", "")
    (root / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("PATH", str(root / "build" / "bin"))
    bench, convert = llama_cpp.find(None if where == "path" else str(root))
    assert bench.resolve() == (root / "build" / "bin" / "llama-bench").resolve()
    assert convert.resolve() == (root / "convert_hf_to_gguf.py").resolve()


def test_a_failing_tool_is_named_with_its_stderr(tmp_path):
    tool = tmp_path / "llama-bench"
    _script(tool, "import sys\nprint('unknown argument: -q', file=sys.stderr)\nsys.exit(2)\n")
    with pytest.raises(RuntimeError, match=r"llama-bench failed \(exit 2\)[\s\S]*unknown argument: -q"):
        llama_cpp.run([str(tool), "-q"], "llama-bench")
