"""`python -m convert neox`: slim shards written from a tiny random HF GPT-NeoX (TP 1, 2, 4, both residuals) convert to
HF's logits; the 20B layout plan; the YAML read as GPT-NeoX reads it; bad input refused with a clear error."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import neox_jax
from conftest import ROOT, hf_logits, make_hf_model
from convert.__main__ import main
from convert.neox_layout import CAT0, CAT1, REPLICATED, SUM, layer_file, plan, write_slim, yaml_20b_style
from convert.neox_yaml import load_yaml, model_args, read_neox_args
from convert.sources import ConvertError
from neox_jax.model.config import PRESETS, NeoXConfig
from neox_jax.store.checkpoint import CheckpointError

STEP = "global_step150000"
IDS = np.random.RandomState(0).randint(0, 128, (2, 13))
RESIDUALS = {
    "parallel": dict(use_parallel_residual=True, hidden_act="gelu_fast"),  # 20B: bias-gelu-fusion
    "sequential": dict(use_parallel_residual=False, hidden_act="gelu"),
}


class RunsCode:
    """Unpickling this runs code (it creates `marker`): a loader with weights_only=False would execute it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def hf_state(model) -> dict:
    return {k.replace("lm_head.", "embed_out."): v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 100)}}, "<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "20B_tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def models():
    return {name: make_hf_model(seed=3, **kw) for name, kw in RESIDUALS.items()}


@pytest.fixture(scope="session")
def slim_tp2(models, tiny_tokenizer, tmp_path_factory):
    """Slim shards of the parallel-residual model at TP 2; its mp_rank files would run code if loaded."""
    model, root = models["parallel"], tmp_path_factory.mktemp("slim")
    cfg = NeoXConfig.from_hf_config(model.config.to_dict())
    state = hf_state(model)
    src = write_slim(
        root / "src",
        cfg,
        state.__getitem__,
        2,
        tokenizer=tiny_tokenizer,
        mp_rank_payload={"args": RunsCode(root / "MP_RANK_LOADED")},
    )
    return model, src


def convert(src, out, *extra):
    """Runs the real CLI entry point in this process (no interpreter start-up per case); returns the exit code."""
    return main(["neox", str(src), str(out), "--quiet", *map(str, extra)])


def edit_rank_file(path, fn):
    import torch

    state = torch.load(path, weights_only=True)
    fn(state)
    torch.save(state, path)


# ---- layout and config ------------------------------------------------------------------------------------------
def test_20b_plan_without_weights():
    args = model_args(read_neox_args_text(yaml_20b_style(PRESETS["neox-20b"], 2)), "20B.yml")
    cfg = args.config(vocab_size=50432)
    assert cfg == PRESETS["neox-20b"] and cfg.hidden_act == "gelu_fast"
    layers = plan(cfg, 2)
    assert [x.index for x in layers] == [0, *range(2, 46), 47, 48]
    assert layers[0].file(1) == "layer_00-model_01-model_states.pt" and layers[-1].file(0) == layer_file(48, 0)
    shapes = {(x.index, t.name): (t.rank_shape, t.merged_shape, t.merge) for x in layers for t in x.tensors}
    assert shapes[0, "word_embeddings.weight"] == ((25216, 6144), (50432, 6144), CAT0)
    assert shapes[2, "attention.query_key_value.weight"] == ((9216, 6144), (18432, 6144), CAT0)
    assert shapes[2, "attention.query_key_value.bias"] == ((9216,), (18432,), CAT0)
    assert shapes[45, "attention.dense.weight"] == ((6144, 3072), (6144, 6144), CAT1)
    assert shapes[45, "attention.dense.bias"] == ((6144,), (6144,), SUM)  # gpt_j_residual: summed over ranks
    assert shapes[2, "mlp.dense_h_to_4h.weight"] == ((12288, 6144), (24576, 6144), CAT0)
    assert shapes[2, "mlp.dense_4h_to_h.weight"] == ((6144, 12288), (6144, 24576), CAT1)
    assert shapes[2, "input_layernorm.weight"] == ((6144,), (6144,), REPLICATED)
    assert shapes[2, "attention.rotary_emb.inv_freq"][0] == (12,)  # rotary dims 24 of head dim 96
    assert shapes[47, "norm.weight"] == ((6144,), (6144,), REPLICATED)
    assert shapes[48, "final_linear.weight"] == ((25216, 6144), (50432, 6144), CAT0)
    merged = sum(int(np.prod(t.merged_shape)) for x in layers for t in x.tensors if t.hf_name)
    assert merged == cfg.num_params == 20_554_567_680
    sequential = {t.name: t.merge for t in plan(cfg.replace(use_parallel_residual=False), 4)[1].tensors}
    assert sequential["attention.dense.bias"] == sequential["mlp.dense_4h_to_h.bias"] == REPLICATED


def read_neox_args_text(text):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.yml").write_text(text)
        return read_neox_args([Path(d) / "c.yml"])


def test_yaml_read_like_gpt_neox():
    yaml = pytest.importorskip("yaml")
    text = yaml_20b_style(PRESETS["neox-20b"], 2)
    assert load_yaml(text) == yaml.full_load(text)  # comments, True, trailing commas, nested sections
    block = "num-layers: 2\nhidden_size: 64  # block style works too\nnum-attention-heads: 4\npos-emb: 'rotary'\n"
    args = model_args(read_neox_args_text(block), "c.yml")
    # GPT-NeoX defaults for unset keys
    assert (args.layernorm_epsilon, args.rotary_emb_base, args.rotary_pct, args.hidden_act) == (1e-5, 1e4, 1.0, "gelu")
    assert not args.gpt_j_residual and args.tied_embeddings and args.intermediate_size == 256
    with pytest.raises(ConvertError, match="'hidden-size' is set twice"):
        read_neox_args_text(block + "hidden-size: 64\n")
    with pytest.raises(ConvertError, match="pos-emb 'learned'"):
        model_args(read_neox_args_text(block.replace("pos-emb: 'rotary'", "")), "c.yml")


# ---- conversion equals the reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("residual", list(RESIDUALS))
def test_slim_shards_give_hf_logits(residual, models, tiny_tokenizer, tmp_path):
    model = models[residual]
    cfg = NeoXConfig.from_hf_config(model.config.to_dict())
    state, ref = hf_state(model), hf_logits(model, IDS)
    marker = tmp_path / "MP_RANK_LOADED"
    for tp in (1, 2, 4):
        src = write_slim(
            tmp_path / f"src{tp}",
            cfg,
            state.__getitem__,
            tp,
            tokenizer=tiny_tokenizer,
            seed=tp,
            mp_rank_payload={"args": RunsCode(marker)},
        )
        assert convert(src, tmp_path / f"ckpt{tp}", "--dtype", "float32") == 0
        ours = neox_jax.load(tmp_path / f"ckpt{tp}")
        assert ours.config == cfg and ours.tokenizer is not None
        assert np.abs(ours.logits(IDS) - ref).max() <= 1e-4, f"tp={tp}"
    assert not marker.exists(), "an mp_rank file was unpickled"


def test_small_drift_between_ranks_is_averaged_and_reported(slim_tp2, tmp_path):
    from convert.neox import convert_neox

    model, base = slim_tp2
    src = shutil.copytree(base, tmp_path / "src")
    f = src / STEP / layer_file(2, 1)
    edit_rank_file(f, lambda s: s["input_layernorm.weight"].add_(2e-3))
    summary = convert_neox(src, tmp_path / "ckpt", progress=False)
    assert abs(summary["replicated_max_diff"] - 2e-3) < 1e-4
    assert "input_layernorm" in summary["replicated_max_diff_tensor"]
    got = np.asarray(neox_jax.load(tmp_path / "ckpt").params["layers"][0]["input_layernorm"]["weight"])
    want = model.gpt_neox.layers[0].input_layernorm.weight.detach().numpy() + 1e-3
    np.testing.assert_allclose(got, want, atol=1e-6)


# ---- bad input: a clear error naming the file and the tensor, exit code 1, no output --------------------------------
def _bad(src, tmp_path, capsys, *extra):
    out = tmp_path / "out"
    rc = convert(src, out, *extra)
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: "), err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    return err


def test_pickle_that_runs_code_is_refused(slim_tp2, tmp_path, capsys):
    import torch

    src = shutil.copytree(slim_tp2[1], tmp_path / "src")
    marker, f = tmp_path / "CODE_RAN", src / STEP / layer_file(3, 1)
    state = torch.load(f, weights_only=True)
    state["attention.dense.weight"] = RunsCode(marker)
    torch.save(state, f)
    err = _bad(src, tmp_path, capsys)
    assert str(f) in err and "refused" in err and "attention.dense.weight" in err
    assert not marker.exists()
    # the payload is live: an unsafe loader would have run it
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(f)!r}, weights_only=False)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"},
        check=True,
    )
    assert marker.read_text() == "code ran"


def test_missing_rank_file(slim_tp2, tmp_path, capsys):
    src = shutil.copytree(slim_tp2[1], tmp_path / "src")
    (src / STEP / layer_file(3, 1)).unlink()
    err = _bad(src, tmp_path, capsys)
    assert f"{layer_file(3, 1)}: missing rank file" in err and "attention.query_key_value.weight" in err


def test_truncated_file(slim_tp2, tmp_path, capsys):
    src = shutil.copytree(slim_tp2[1], tmp_path / "src")
    f = src / STEP / layer_file(2, 0)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = _bad(src, tmp_path, capsys)
    assert str(f) in err and "truncated" in err and "mlp.dense_4h_to_h.weight" in err


def test_shape_disagreeing_with_config(slim_tp2, tmp_path, capsys):
    src = shutil.copytree(slim_tp2[1], tmp_path / "src")
    yml = src / "configs" / "20B.yml"
    yml.write_text(yml.read_text().replace('"seq-length"', '"intermediate_size": 128,\n  "seq-length"'))
    err = _bad(src, tmp_path, capsys)
    assert layer_file(2, 0) in err and "tensor mlp.dense_h_to_4h.weight: expected shape [64, 64]" in err
    assert "found [128, 64]" in err


def test_replicated_layernorms_differ(slim_tp2, tmp_path, capsys):
    src = shutil.copytree(slim_tp2[1], tmp_path / "src")
    edit_rank_file(src / STEP / layer_file(3, 1), lambda s: s["post_attention_layernorm.bias"].add_(0.5))
    err = _bad(src, tmp_path, capsys)
    assert "layer_03-model_*-model_states.pt: tensor post_attention_layernorm.bias" in err
    assert "differs between tensor-parallel ranks by up to 0.5" in err


def test_nonfinite_weights_refused_unless_allowed(slim_tp2, tmp_path, capsys):
    src = shutil.copytree(slim_tp2[1], tmp_path / "src")
    f = src / STEP / layer_file(2, 1)
    edit_rank_file(f, lambda s: s["mlp.dense_h_to_4h.weight"].__setitem__((3, 4), float("inf")))
    err = _bad(src, tmp_path, capsys)
    assert f"{f}: tensor mlp.dense_h_to_4h.weight: contains NaN/Inf" in err
    assert convert(src, tmp_path / "kept", "--allow-nonfinite") == 0
    kernel = neox_jax.load(tmp_path / "kept").params["layers"][0]["mlp"]["dense_h_to_4h"]["kernel"]
    assert np.isinf(np.asarray(kernel)).sum() == 1


# ---- interruption -------------------------------------------------------------------------------------------------
def test_killed_conversion_leaves_nothing_finished_and_rerun_succeeds(slim_tp2, tmp_path):
    model, base = slim_tp2
    src = shutil.copytree(base, tmp_path / "src")
    last = src / STEP / layer_file(6, 1)  # the output layer, converted last
    real = last.read_bytes()
    last.unlink()
    os.mkfifo(last)  # opening it blocks: the conversion stops there, every earlier group written
    out = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "convert", "neox", str(src), str(out), "--quiet"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not list(tmp_path.glob("ckpt.tmp-*/params/final_layer_norm")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "conversion did not reach the last layer"
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        proc.kill()
        proc.stderr.close()
    assert not out.exists()
    with pytest.raises(CheckpointError):
        neox_jax.load(out)
    last.unlink()
    last.write_bytes(real)
    assert convert(src, out) == 0
    assert np.abs(neox_jax.load(out).logits(IDS) - hf_logits(model, IDS)).max() <= 1e-4


def test_slim_to_neox_to_hf_round_trip(slim_tp2, tmp_path):
    """The published-layout path end to end: slim shards -> neox-jax -> `to-hf` -> transformers, same logits."""
    from transformers import AutoModelForCausalLM

    model, src = slim_tp2
    assert convert(src, tmp_path / "ckpt") == 0
    assert main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--quiet"]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert back.config.use_parallel_residual and back.config.hidden_act == "gelu_fast"
    assert np.abs(hf_logits(back, IDS) - hf_logits(model, IDS)).max() <= 1e-4


def test_legacy_format_rank_file_is_read_safely(slim_tp2, tmp_path):
    """A pre-1.6 (non-zip) torch.save file cannot be memory-mapped: it is read whole, still with weights_only."""
    import torch

    model, base = slim_tp2
    src = shutil.copytree(base, tmp_path / "src")
    f = src / STEP / layer_file(3, 0)
    torch.save(torch.load(f, weights_only=True), f, _use_new_zipfile_serialization=False)
    assert convert(src, tmp_path / "ckpt") == 0
    assert np.abs(neox_jax.load(tmp_path / "ckpt").logits(IDS) - hf_logits(model, IDS)).max() <= 1e-4


def test_tied_embeddings_and_float16_shards(tmp_path):
    """GPT-NeoX's default (no `no-weight-tying`): no layer L+4 file, the output layer is word_embeddings. float16
    shards (as 20B's) give a float16 checkpoint unless --dtype says otherwise."""
    import torch

    model = make_hf_model(seed=6)
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(model.gpt_neox.embed_in.weight)
        for p in model.parameters():
            p.copy_(p.half().float())  # the reference holds exactly the float16 values the shards carry
    cfg = NeoXConfig.from_hf_config(model.config.to_dict())
    state = hf_state(model)
    src = write_slim(tmp_path / "src", cfg, lambda n: state[n].astype(np.float16), 2, tied_embeddings=True)
    assert not (src / STEP / layer_file(cfg.num_hidden_layers + 4, 0)).exists()
    assert convert(src, tmp_path / "ckpt") == 0
    ours = neox_jax.load(tmp_path / "ckpt", dtype="float32")
    assert neox_jax.load(tmp_path / "ckpt").dtype == np.float16
    assert np.abs(ours.logits(IDS) - hf_logits(model, IDS)).max() <= 1e-4
