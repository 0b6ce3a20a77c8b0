"""NeoXConfig: every knob GPT-NeoX needs for inference, with the named presets.

One frozen dataclass. Derived sizes (head_dim, rotary_dims, num_params) are properties, never stored twice.
Field names follow the Hugging Face `GPTNeoXConfig` (transformers 4 layout) so `config.json` maps nearly 1:1.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HIDDEN_ACTS = ("gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class NeoXConfig:
    vocab_size: int  # rows of embed_in / embed_out (padded: 50432 for 20B, 50304 for Pythia)
    hidden_size: int  # D
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    intermediate_size: int  # F (4 * D for all published models, but not required)
    rotary_pct: float = 0.25  # fraction of each head's features that are rotated
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True  # NeoX's gpt_j_residual: x + attn(ln1(x)) + mlp(ln2(x))
    hidden_act: str = "gelu"  # "gelu" = exact erf; "gelu_fast" / "gelu_new" = tanh approximation
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"NeoXConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise ValueError(f"rotary_dims = int(head_dim * rotary_pct) = {self.rotary_dims} must be even")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of {HIDDEN_ACTS}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not GPT-NeoX: its output layer (embed_out) is untied")

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:  # H
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:  # R: the rotated features at the start of each head
        return int(self.head_dim * self.rotary_pct)

    @property
    def num_params(self) -> int:
        d, f, v, layers = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        b = 1 if self.attention_bias else 0
        per_layer = 4 * d + (d * 3 * d + 3 * d * b) + (d * d + d * b) + (d * f + f) + (f * d + d)
        return 2 * v * d + layers * per_layer + 2 * d

    # ---- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NeoXConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown NeoXConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json") -> NeoXConfig:
        """Reads a HF GPTNeoXConfig dict, in the transformers 4 layout (`rotary_pct`, `rotary_emb_base`, as the
        published Pythia / 20B checkpoints carry) or the transformers 5 layout (`rope_parameters` with
        `partial_rotary_factor`, `rope_theta`)."""
        model_type = hf.get("model_type")
        if model_type != "gpt_neox":
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'gpt_neox' (GPTNeoXForCausalLM)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"{source}: rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        rotary_pct = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
        rotary_base = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                rotary_pct=float(rotary_pct),
                rotary_emb_base=float(rotary_base),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
                use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
                hidden_act=hf.get("hidden_act", "gelu"),
                attention_bias=bool(hf.get("attention_bias", True)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id", 0) if hf.get("bos_token_id") is not None else 0,
                eos_token_id=hf.get("eos_token_id", 0) if hf.get("eos_token_id") is not None else 0,
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing required key {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers 4 and 5 both load as GPTNeoXForCausalLM."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_emb_base,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rotary_emb_base,
                "partial_rotary_factor": self.rotary_pct,
            },
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "hidden_act": self.hidden_act,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": 0.02,
            "use_cache": True,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> NeoXConfig:
        return cls.from_hf_config(json.loads(Path(path).read_text()), source=str(path))

    def replace(self, **changes) -> NeoXConfig:
        return dataclasses.replace(self, **changes)


def _pythia(d: int, layers: int, n: int) -> NeoXConfig:
    return NeoXConfig(
        vocab_size=50304, hidden_size=d, num_hidden_layers=layers, num_attention_heads=n, intermediate_size=4 * d
    )


PRESETS: dict[str, NeoXConfig] = {
    "neox-20b": NeoXConfig(
        vocab_size=50432,
        hidden_size=6144,
        num_hidden_layers=44,
        num_attention_heads=64,
        intermediate_size=24576,
        hidden_act="gelu_fast",
    ),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    "pythia-6.9b": _pythia(4096, 32, 32),
    "pythia-12b": _pythia(5120, 36, 40),
    # for tests: fast to compile, every code path exercised (partial rotary, parallel residual)
    "tiny": NeoXConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=256,
    ),
}


def preset(name: str) -> NeoXConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
