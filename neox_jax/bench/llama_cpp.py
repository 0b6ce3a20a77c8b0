"""llama.cpp beside `benchmark decode`: its `llama-bench` on a model of the same shapes in f32, f16 and q8_0, one
sequence (batch 1), when llama.cpp is here. The GGUF files come from llama.cpp's own converter
(`convert_hf_to_gguf.py`) run on a random-weight transformers GPT-NeoX of the preset's shapes with the 20B
tokenizer (what the converter needs to write a vocabulary), so the weights differ from neox-jax's random ones but
every shape is the same: only speed is compared.

Where llama.cpp is: `--llama-cpp DIR`, a llama.cpp checkout (DIR/convert_hf_to_gguf.py) built with CMake
(DIR/build/bin/llama-bench), or else `llama-bench` on PATH with the checkout two folders above it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TYPES = ("f32", "f16", "q8_0")  # convert_hf_to_gguf.py --outtype values


def find(llama_cpp: str | None) -> tuple[Path, Path] | str:
    """(llama-bench, convert_hf_to_gguf.py), or a sentence saying what is missing."""
    if llama_cpp:
        root = Path(llama_cpp)
        bench = next((p for p in (root / "build" / "bin" / "llama-bench", root / "llama-bench") if p.is_file()), None)
        if bench is None:
            return f"no llama-bench under {root}/build/bin (build llama.cpp with CMake first)"
    else:
        found = shutil.which("llama-bench")
        if found is None:
            return "llama-bench is not on PATH (or pass --llama-cpp DIR, a built llama.cpp checkout)"
        bench = Path(found).resolve()
        root = bench.parents[2] if len(bench.parents) > 2 else bench.parent
    convert = root / "convert_hf_to_gguf.py"
    if not convert.is_file():
        return f"no convert_hf_to_gguf.py in {root} (pass --llama-cpp DIR, the llama.cpp checkout)"
    return bench, convert


def parse(text: str) -> list[dict]:
    """llama-bench's `-o json` output -> [{"type", "tokens/s", "stddev"}], one per generation test. The weight type
    is read off the file name (model-TYPE.gguf: llama-bench's model_type names the converter's guess)."""
    out = []
    for r in json.loads(text):
        if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            stem = Path(r["model_filename"]).stem
            kind = stem.removeprefix("model-") if stem.startswith("model-") else r["model_type"].split()[-1].lower()
            out.append({"type": kind, "tokens/s": r["avg_ts"], "stddev": r.get("stddev_ts", 0.0)})
    return out


def hf_model(cfg, out: Path, tokenizer: Path) -> Path:
    """A random transformers GPTNeoXForCausalLM of cfg's shapes, saved with the tokenizer."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_cfg = GPTNeoXConfig(**cfg.to_hf_config())
    torch.manual_seed(0)
    GPTNeoXForCausalLM(hf_cfg).save_pretrained(out)
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


# llama.cpp's converter reads the config through transformers' AutoConfig and its GPT-NeoX code reads `rotary_pct`,
# which transformers 5 keeps as rope_parameters["partial_rotary_factor"] only: the converter runs with it put back.
SHIM = """
import os, runpy, sys, transformers
to_dict = transformers.GPTNeoXConfig.to_dict
def with_rotary_pct(self):
    d = to_dict(self)
    d.setdefault("rotary_pct", (d.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    return d
transformers.GPTNeoXConfig.to_dict = with_rotary_pct
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cmd: list[str], what: str) -> str:
    """stdout of cmd; its log stays quiet unless it fails, then the error names it with the end of its stderr."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {' '.join(cmd[:4])} ...\n{r.stderr[-3000:]}")
    return r.stdout


def rows(cfg, new: int, tokenizer: Path | None, llama_cpp: str | None) -> list[dict]:
    """llama-bench's tokens/s for one sequence generating `new` tokens, per weight type, or [] after one line
    saying why it was skipped."""
    where = find(llama_cpp)
    if isinstance(where, str):
        print(f"llama.cpp skipped: {where}")
        return []
    if tokenizer is None:
        print("llama.cpp skipped: its converter needs a tokenizer (20B_tokenizer.json in $NEOX_JAX_DATA_DIR)")
        return []
    bench, convert = where
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(cfg, Path(tmp) / "hf", tokenizer)
        models = []
        for t in TYPES:
            gguf = Path(tmp) / f"model-{t}.gguf"
            cmd = [sys.executable, "-c", SHIM, str(convert), str(hf), "--outfile", str(gguf), "--outtype", t]
            run(cmd, f"llama.cpp's converter ({t})")
            models += ["-m", str(gguf)]
        threads = str(os.cpu_count())
        cmd = [str(bench), *models, "-p", "0", "-n", str(new), "-t", threads, "-r", "3", "-o", "json"]
        text = run(cmd, "llama-bench")
    return [{"engine": f"llama.cpp {r['type']}", "batch": 1, **r} for r in parse(text)]
