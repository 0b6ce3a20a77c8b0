"""NeoXConfig: presets, both HF config.json layouts, the 20B parameter count without allocating."""

import jax
import numpy as np
import pytest

from neox_jax.model.config import PRESETS, NeoXConfig, preset
from neox_jax.model.neox import abstract_params

# config.json as the published EleutherAI/pythia-160m carries it (transformers 4 layout)
PYTHIA_160M_T4 = {
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.24.0",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}


def test_20b_parameter_count_without_allocating():
    cfg = preset("neox-20b")
    shapes = abstract_params(cfg, jax.numpy.float16)
    leaves = jax.tree.leaves(shapes)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert sum(int(np.prod(x.shape)) for x in leaves) == 20_554_567_680 == cfg.num_params
    assert shapes["layers"][0]["attention"]["query_key_value"]["kernel"].shape == (6144, 64, 3, 96)
    assert cfg.head_dim == 96 and cfg.rotary_dims == 24


def test_transformers4_layout_matches_preset():
    assert NeoXConfig.from_hf_config(PYTHIA_160M_T4) == PRESETS["pythia-160m"]


def test_transformers5_layout():
    t5 = {k: v for k, v in PYTHIA_160M_T4.items() if k not in ("rotary_pct", "rotary_emb_base")}
    t5["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    assert NeoXConfig.from_hf_config(t5) == PRESETS["pythia-160m"]


def test_round_trip_through_hf_dict():
    for cfg in PRESETS.values():
        assert NeoXConfig.from_hf_config(cfg.to_hf_config()) == cfg
        assert NeoXConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"model_type": "llama"}, "expected 'gpt_neox'"),
        ({"hidden_act": "swish"}, "hidden_act"),
        ({"num_attention_heads": 7}, "not divisible"),
        ({"tie_word_embeddings": True}, "untied"),
    ],
)
def test_bad_configs(bad, msg):
    with pytest.raises(ValueError, match=msg):
        NeoXConfig.from_hf_config({**PYTHIA_160M_T4, **bad})


def test_missing_key_names_it():
    cfg = dict(PYTHIA_160M_T4)
    del cfg["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        NeoXConfig.from_hf_config(cfg, source="x/config.json")
