"""The GPT-NeoX slim-shard layout: which file holds which tensor, its per-rank shape, and how ranks merge.

GPT-NeoX trains with DeepSpeed's PipelineModule, which saves each pipeline layer as
`global_stepN/layer_LL-model_RR-model_states.pt` (LL the layer's index in the pipe spec list, RR the tensor-parallel
rank). GPT2ModelPipe's spec list, for L transformer blocks:

    0        EmbeddingPipe          word_embeddings.weight                          [V/tp, D]   concat dim 0
    1        _pre_transformer_block (a function: no file)
    2..L+1   ParallelTransformerLayerPipe, block i = LL - 2
               input_layernorm / post_attention_layernorm .{weight,bias}  [D]     replicated
               attention.query_key_value.{weight [3D/tp, D], bias [3D/tp]}         concat dim 0 (per-head rows)
               attention.dense.weight [D, D/tp]                                    concat dim 1
               attention.dense.bias [D]        summed (gpt_j_residual) / replicated (sequential)
               attention.rotary_emb.inv_freq [R/2]   a buffer: checked against the config, then recomputed
               mlp.dense_h_to_4h.{weight [F/tp, D], bias [F/tp]}                   concat dim 0
               mlp.dense_4h_to_h.weight [D, F/tp]                                  concat dim 1
               mlp.dense_4h_to_h.bias [D]      summed (gpt_j_residual) / replicated (sequential)
    L+2      _post_transformer_block (a function: no file)
    L+3      NormPipe               norm.{weight,bias} [D]                          replicated
    L+4      ParallelLinearPipe     final_linear.weight [V/tp, D] (column) or [V, D/tp] (row)
             (absent with weight tying: the output layer is word_embeddings of layer 0)

Row-parallel biases: under gpt_j_residual each rank adds its own bias before the single all-reduce
(`residual + reduce(attn + mlp)`), so the effective bias is the sum over ranks; under the sequential residual the bias
is added once after the all-reduce and every rank holds the same copy.

`plan` is the single description of that layout (the converter and the tests use it); `split` and `write_slim` are its
inverse, used to build slim shards from a HF model in tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from neox_jax.model.config import NeoXConfig

CAT0, CAT1, REPLICATED, SUM, BUFFER = "concat dim 0", "concat dim 1", "replicated", "sum", "buffer"


@dataclasses.dataclass(frozen=True)
class SlimTensor:
    name: str  # key in the layer file
    hf_name: str | None  # the HF GPT-NeoX tensor it becomes; None for a buffer (checked, then recomputed)
    rank_shape: tuple[int, ...]
    merged_shape: tuple[int, ...]
    merge: str


@dataclasses.dataclass(frozen=True)
class SlimLayer:
    index: int  # LL: the DeepSpeed pipe layer index
    group: str  # the neox-jax checkpoint group it fills
    tensors: tuple[SlimTensor, ...]

    def file(self, rank: int) -> str:
        return layer_file(self.index, rank)


def layer_file(index: int, rank: int) -> str:
    return f"layer_{index:02d}-model_{rank:02d}-model_states.pt"


def inv_freq(cfg: NeoXConfig) -> np.ndarray:  # [R/2], as GPT-NeoX's RotaryEmbedding computes it
    r = cfg.rotary_dims
    return (1.0 / cfg.rotary_emb_base ** (np.arange(0, r, 2, dtype=np.float32) / r)).astype(np.float32)


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} {n} is not divisible by the tensor-parallel degree {tp}")
    return n // tp


def plan(
    cfg: NeoXConfig, tp: int, tied_embeddings: bool = False, output_parallelism: str = "column"
) -> list[SlimLayer]:
    """Every layer file of a slim checkpoint for cfg at tensor-parallel degree tp, in conversion order."""
    d, f, v, n, L = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.num_attention_heads,
        cfg.num_hidden_layers,
    )
    _divide(n, tp, "num_attention_heads")
    vp, fp, dp = _divide(v, tp, "vocab size"), _divide(f, tp, "intermediate size"), _divide(d, tp, "hidden size")
    row_bias = SUM if cfg.use_parallel_residual else REPLICATED
    emb = SlimTensor("word_embeddings.weight", "gpt_neox.embed_in.weight", (vp, d), (v, d), CAT0)
    out = [SlimLayer(0, "embed_in", (emb,))]
    for i in range(L):
        pre = f"gpt_neox.layers.{i}."

        def t(name, rank_shape, merged_shape, merge, hf=True):
            return SlimTensor(name, pre + name if hf else None, rank_shape, merged_shape, merge)

        ts = [t(f"input_layernorm.{p}", (d,), (d,), REPLICATED) for p in ("weight", "bias")]
        ts += [t(f"post_attention_layernorm.{p}", (d,), (d,), REPLICATED) for p in ("weight", "bias")]
        ts.append(t("attention.query_key_value.weight", (3 * dp, d), (3 * d, d), CAT0))
        if cfg.attention_bias:
            ts.append(t("attention.query_key_value.bias", (3 * dp,), (3 * d,), CAT0))
        ts.append(t("attention.dense.weight", (d, dp), (d, d), CAT1))
        if cfg.attention_bias:
            ts.append(t("attention.dense.bias", (d,), (d,), row_bias))
        ts.append(
            t("attention.rotary_emb.inv_freq", (cfg.rotary_dims // 2,), (cfg.rotary_dims // 2,), BUFFER, hf=False)
        )
        ts += [
            t("mlp.dense_h_to_4h.weight", (fp, d), (f, d), CAT0),
            t("mlp.dense_h_to_4h.bias", (fp,), (f,), CAT0),
            t("mlp.dense_4h_to_h.weight", (d, fp), (d, f), CAT1),
            t("mlp.dense_4h_to_h.bias", (d,), (d,), row_bias),
        ]
        out.append(SlimLayer(i + 2, f"layers.{i}", tuple(ts)))
    out.append(
        SlimLayer(
            L + 3,
            "final_layer_norm",
            tuple(
                SlimTensor(f"norm.{p}", f"gpt_neox.final_layer_norm.{p}", (d,), (d,), REPLICATED)
                for p in ("weight", "bias")
            ),
        )
    )
    if tied_embeddings:
        out.append(SlimLayer(0, "embed_out", (dataclasses.replace(emb, hf_name="embed_out.weight"),)))
    elif output_parallelism == "row":
        out.append(
            SlimLayer(
                L + 4, "embed_out", (SlimTensor("final_linear.weight", "embed_out.weight", (v, dp), (v, d), CAT1),)
            )
        )
    else:
        out.append(
            SlimLayer(
                L + 4, "embed_out", (SlimTensor("final_linear.weight", "embed_out.weight", (vp, d), (v, d), CAT0),)
            )
        )
    return out


def split(t: SlimTensor, merged: np.ndarray, tp: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """The inverse of the merge: per-rank tensors whose merge gives `merged`. Summed float32 biases are split into
    random parts (so a converter that takes one copy, or the mean, instead of the sum is caught)."""
    if t.merge == CAT0:
        return np.split(merged, tp, axis=0)
    if t.merge == CAT1:
        return np.split(merged, tp, axis=1)
    if t.merge == SUM:
        if merged.dtype != np.float32:  # float16: random parts would not sum back exactly; halves do (tp = 2^k)
            return [merged / np.asarray(tp, merged.dtype) for _ in range(tp)]
        rng = rng or np.random.default_rng(0)
        parts = [rng.normal(0, 0.05, merged.shape).astype(merged.dtype) for _ in range(tp - 1)]
        return [merged - sum(parts, np.zeros_like(merged)), *parts]
    return [merged.copy() for _ in range(tp)]


def yaml_20b_style(
    cfg: NeoXConfig, tp: int, tied_embeddings: bool = False, tokenizer: str = "20B_tokenizer.json"
) -> str:
    """A config in the style of the published configs/20B.yml: comments, `True`, trailing commas, dashes and
    underscores mixed, nested optimizer sections GPT-NeoX ignores for inference."""
    act = {
        "gelu_fast": '"bias-gelu-fusion": True,',
        "gelu": '"bias-gelu-fusion": false,  # exact erf GELU',
        "relu": '"activation": "relu",',
        "gelu_new": '"openai_gelu": true,',
    }[cfg.hidden_act]
    return f"""# DISCLAIMER: a GPT-NeoX config in the style of 20B.yml
{{
  # Tokenizer /  checkpoint settings
  "vocab-file": "./20B_checkpoints/{tokenizer}",
  "save": "./20B_checkpoints",

  # parallelism settings ( this # is not a comment start inside a string: "a # b" )
  "pipe-parallel-size": 4,
  "model-parallel-size": {tp},

  # model settings
  "num-layers": {cfg.num_hidden_layers},
  "hidden-size": {cfg.hidden_size},
  "num-attention-heads": {cfg.num_attention_heads},
  "seq-length": {cfg.max_position_embeddings},
  "max-position-embeddings": {cfg.max_position_embeddings},
  "norm": "layernorm",
  "pos-emb": "rotary",
  "rotary_pct": {cfg.rotary_pct},
  "rotary_emb_base": {cfg.rotary_emb_base:g},
  "layernorm-epsilon": {cfg.layer_norm_eps:.1e},
  "no-weight-tying": {"false" if tied_embeddings else "true"},
  "gpt_j_residual": {"True" if cfg.use_parallel_residual else "False"},
  "output_layer_parallelism": "column",
  "scaled-upper-triang-masked-softmax-fusion": true,
  {act}
{"" if cfg.intermediate_size == 4 * cfg.hidden_size else f'  "intermediate_size": {cfg.intermediate_size},'}
  # optimizer settings
  "optimizer": {{
    "type": "Adam",
    "params": {{
      "lr": 0.97e-4,
      "betas": [0.9, 0.95],
      "eps": 1.0e-8,
      }}
  }},
  "zero_optimization": {{
  "stage": 1,
  "allgather_partitions": True,
  "contiguous_gradients": True,
  }},
  "split": "995,4,1",
  "checkpoint-factor": 500, # this variable previously called `save-interval`
  "tokenizer_type": "HFTokenizer",
}}
"""


def write_slim(
    out: str | Path,
    cfg: NeoXConfig,
    tensor: Callable[[str], np.ndarray],
    tp: int,
    *,
    step: int = 150000,
    tied_embeddings: bool = False,
    mp_rank_payload=None,
    tokenizer: str | Path | None = None,
    seed: int = 0,
) -> Path:
    """Writes slim shards in the published layout: configs/20B.yml, latest, global_stepN/layer_*.pt, mp_rank_*.pt.
    tensor(hf_name) -> the merged tensor in HF layout (float numpy); called once per tensor, so a generator of
    synthetic layers never holds the model. mp_rank_payload: what the mp_rank files hold (default: no weights)."""
    import torch

    out = Path(out)
    step_dir = out / f"global_step{step}"
    step_dir.mkdir(parents=True)
    (out / "configs").mkdir()
    (out / "configs" / "20B.yml").write_text(yaml_20b_style(cfg, tp, tied_embeddings))
    (out / "latest").write_text(f"global_step{step}\n")
    if tokenizer is not None:
        (out / "20B_tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    rng = np.random.default_rng(seed)
    for layer in plan(cfg, tp, tied_embeddings):
        if (step_dir / layer.file(0)).exists():
            continue  # tied output layer: layer 0 already written
        ranks: list[dict] = [{} for _ in range(tp)]
        for t in layer.tensors:
            merged = inv_freq(cfg) if t.merge == BUFFER else tensor(t.hf_name)
            for r, part in enumerate(split(t, np.asarray(merged), tp, rng)):
                ranks[r][t.name] = torch.from_numpy(np.ascontiguousarray(part))
        for r in range(tp):
            torch.save(ranks[r], step_dir / layer.file(r))
    for i in range(tp * 4):  # pipe x model ranks: DeepSpeed's per-rank engine state, no weights in slim checkpoints
        payload = mp_rank_payload if mp_rank_payload is not None else {"module": None, "mp_world_size": tp}
        torch.save(payload, step_dir / f"mp_rank_{i:02d}_model_states.pt")
    return out
