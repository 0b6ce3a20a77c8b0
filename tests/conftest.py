"""Shared fixtures: tiny random Hugging Face GPT-NeoX references, built in the test itself, and a CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neox_jax.model.config import NeoXConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURES = ROOT / "tests" / "fixtures"


def run_cli(*args, check=True, env=None, timeout=600):
    """Runs `python ARGS...` from the repo root with the repo importable; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    r = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(f"command failed ({r.returncode}): {args}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def convert_hf(src, out) -> None:
    """A Hugging Face folder -> a float32 checkpoint, in this process (the converter's own tests run the command)."""
    import warnings

    from convert.hf import convert_hf as convert
    from neox_jax.errors import NeoXWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NeoXWarning)  # a reference without a tokenizer is the common case here
        convert(src, out, "float32", progress=False)


def make_hf_model(seed=0, **overrides):
    """A random transformers GPTNeoXForCausalLM (float32, eval mode) with weights of a realistic scale."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kw = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        rotary_pct=0.25,
        max_position_embeddings=128,
        use_parallel_residual=True,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=0,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**kw)).eval()
    with torch.no_grad():  # HF inits biases to 0 and layernorms to 1: perturb so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """(model, directory): a saved tiny HF GPT-NeoX with parallel residual and rotary_pct 0.25."""
    model = make_hf_model()
    d = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(d)
    return model, d


@pytest.fixture(scope="session")
def tiny_ckpt(hf_tiny, tmp_path_factory):
    """(hf model, neox-jax checkpoint directory)."""
    model, src = hf_tiny
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    convert_hf(src, out)
    return model, out


def micro_config(**overrides) -> NeoXConfig:
    """The smallest config the reliability tests need (faster to build and convert than preset("tiny"))."""
    base = dict(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return NeoXConfig(**{**base, **overrides})


BPE_VOCAB = 300  # ids of the shared byte-level tokenizer (test models give their embeddings more rows)
BPE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Einstein was born in the German Empire.",
    "Über naïve café: déjà vu, 東京 and Zürich.",
    "Hello, world! 1 2 3 4 5 6 7 8 9 10",
] * 20


def train_byte_bpe(path: Path, corpus, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer.json (any text encodes; multi-byte characters split over tokens), with
    <|endoftext|> = 0 and <|padding|> = 1 as in GPT-NeoX's, trained here on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>", "<|padding|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    assert tk.get_vocab_size() == vocab_size
    tk.save(str(path))
    return path


def train_char_bpe(path: Path, texts, vocab_size: int = 128) -> Path:
    """A character-level BPE over printable ASCII (Metaspace words) with <|endoftext|> = 0, trained here on
    `texts`: the small tokenizer the fine-tuning tests train with."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        limit_alphabet=200,
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    tk.train_from_iterator([string.printable, *texts], trainer)
    tk.save(str(path))
    return path


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """The byte-level tokenizer (BPE_VOCAB ids) the generation and sharding tests share."""
    return train_byte_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", BPE_CORPUS, BPE_VOCAB)


@pytest.fixture(scope="session")
def tokenizer_file():
    f = SHARED_DATA / "20B_tokenizer.json"
    if not f.is_file():
        pytest.skip(f"reference data absent: {f} (a fresh clone without ../shared/data)")
    return f


def hf_logits(model, ids, mask=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()


# ---- lm-eval: a Pythia-vocabulary model and local task data (tests/test_evaluation.py, tests/test_eval_client.py)
@pytest.fixture(scope="module")
def data_env():  # module scope: the variable is put back after each file
    if not (SHARED_DATA / "lambada_openai").is_dir():
        pytest.skip(f"reference data absent: {SHARED_DATA} (a fresh clone without ../shared/data)")
    old = os.environ.get("NEOX_JAX_DATA_DIR")
    os.environ["NEOX_JAX_DATA_DIR"] = os.pathsep.join([str(FIXTURES / "eval_data"), str(SHARED_DATA)])
    yield
    if old is None:
        os.environ.pop("NEOX_JAX_DATA_DIR")
    else:
        os.environ["NEOX_JAX_DATA_DIR"] = old


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory, tokenizer_file):
    """(HF directory with tokenizer, converted neox-jax checkpoint): a random GPT-NeoX of Pythia's vocabulary (50304
    rows; the 27 rows past the tokenizer's 50277 ids zeroed, so greedy decoding never picks them) and max length 128,
    so lambada contexts get truncated and tiny shakespeare takes several rolling windows."""
    import torch

    model = make_hf_model(
        seed=3,
        vocab_size=50304,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    with torch.no_grad():
        model.get_output_embeddings().weight[50277:] = 0
    d = tmp_path_factory.mktemp("eval") / "hf"
    model.save_pretrained(d)
    shutil.copyfile(tokenizer_file, d / "tokenizer.json")
    from convert.hf import tokenizer_config

    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(128)))
    ckpt = d.parent / "ckpt"
    convert_hf(d, ckpt)
    return d, ckpt


@pytest.fixture(scope="module")
def task_manager(data_env):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(FIXTURES / "eval_tasks"), include_defaults=False)
