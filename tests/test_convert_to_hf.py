"""`python -m convert to-hf`: a neox-jax checkpoint written back as a Hugging Face directory that transformers loads
with the same logits (HF -> Orbax -> HF round trip), sharded, in half precision, with the tokenizer."""

import json
import shutil

import numpy as np
import pytest

from conftest import hf_logits, make_hf_model, run_cli
from convert.__main__ import main
from convert.hf import export_hf

IDS = np.random.RandomState(1).randint(0, 128, (2, 15))


@pytest.fixture(scope="module")
def hf_and_ckpt(tmp_path_factory):
    """A non-default reference (sequential residual, tanh GELU, half the head rotated, F != 4D) and its checkpoint."""
    model = make_hf_model(
        seed=5, use_parallel_residual=False, hidden_act="gelu_fast", rotary_pct=0.5, intermediate_size=96
    )
    root = tmp_path_factory.mktemp("to_hf")
    model.save_pretrained(root / "hf")
    assert main(["hf", str(root / "hf"), str(root / "ckpt"), "--quiet"]) == 0
    return model, root / "ckpt"


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_round_trip_hf_orbax_hf_same_logits(hf_and_ckpt, tmp_path):
    model, ckpt = hf_and_ckpt
    run_cli("-m", "convert", "to-hf", ckpt, tmp_path / "back", "--quiet")  # the real CLI
    back = load_hf(tmp_path / "back")
    for key in ("use_parallel_residual", "hidden_act", "intermediate_size", "layer_norm_eps", "vocab_size"):
        assert getattr(back.config, key) == getattr(model.config, key), key
    assert np.abs(hf_logits(back, IDS) - hf_logits(model, IDS)).max() <= 1e-4
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {k.replace("lm_head.", "embed_out.") for k in model.state_dict()}


def test_sharded_half_precision_export(hf_and_ckpt, tmp_path):
    model, ckpt = hf_and_ckpt
    summary = export_hf(ckpt, tmp_path / "back", "bfloat16", shard_bytes=40_000, progress=False)
    out = tmp_path / "back"
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and index["metadata"]["total_size"] == summary["bytes"]
    back = load_hf(out)
    assert str(back.dtype) == "torch.bfloat16"
    ref = hf_logits(model, IDS)
    assert np.abs(hf_logits(back, IDS) - ref).max() <= 0.05 * max(1.0, np.abs(ref).max())


def test_existing_output_refused(hf_and_ckpt, tmp_path, capsys):
    _, ckpt = hf_and_ckpt
    (tmp_path / "taken").mkdir()
    assert main(["to-hf", str(ckpt), str(tmp_path / "taken"), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert not list(tmp_path.glob("taken.tmp*"))


def test_tokenizer_exported(tokenizer_file, hf_and_ckpt, tmp_path):
    from transformers import AutoTokenizer

    import neox_jax

    _, ckpt = hf_and_ckpt
    with_tok = shutil.copytree(ckpt, tmp_path / "ckpt")
    shutil.copyfile(tokenizer_file, with_tok / "tokenizer.json")
    export_hf(with_tok, tmp_path / "back", progress=False)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "back")
    text = "GPT-NeoX-20B, in JAX: ünïcode too."
    assert hf_tok(text)["input_ids"] == neox_jax.load(with_tok).tokenizer.encode(text)
    assert hf_tok.eos_token == "<|endoftext|>"


def test_side_files_travel_and_a_missing_tokenizer_warns(hf_tiny, tokenizer_file, tmp_path):
    """tokenizer_config.json / generation_config.json go into the checkpoint and back out; no tokenizer.json warns."""
    from convert.hf import convert_hf
    from neox_jax.errors import NeoXWarning

    _, src = hf_tiny
    with pytest.warns(NeoXWarning, match="no tokenizer.json"):
        convert_hf(src, tmp_path / "bare", progress=False)
    with_tok = shutil.copytree(src, tmp_path / "src")
    shutil.copyfile(tokenizer_file, with_tok / "tokenizer.json")
    (with_tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 7, "eos_token": "<|endoftext|>"}))
    (with_tok / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 0.5}))
    convert_hf(with_tok, tmp_path / "ckpt", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "ckpt" / name).read_bytes() == (with_tok / name).read_bytes(), name
    export_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["model_max_length"] == 7
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["top_p"] == 0.5
