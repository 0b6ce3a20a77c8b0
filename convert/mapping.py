"""The name map between Hugging Face GPT-NeoX tensors and neox-jax parameters, with the per-tensor transforms.

Each Entry says: our group and path, the HF tensor name and shape, and the two reshapes (HF -> ours, ours -> HF).
HF stores torch Linear weights as [out, in]; ours are kernels [in, out] with one axis per meaning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from neox_jax.model.config import NeoXConfig

# Non-persistent buffers that older transformers wrote into checkpoints: known, recomputed, never parameters.
IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Entry:
    group: str  # checkpoint group: "embed_in", "layers.3", "final_layer_norm", "embed_out"
    path: tuple[str, ...]  # path inside the group
    hf_name: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


def _t(x, tile: int = 64):
    """[a, b] -> contiguous [b, a], copied tile by tile: numpy's one-shot strided transpose runs 3-8x slower on these
    sizes (float16 most), and every weight of a conversion goes through here."""
    x = np.asarray(x)
    out = np.empty(x.shape[::-1], x.dtype)
    for i in range(0, x.shape[0], tile):
        for j in range(0, x.shape[1], tile):
            out[j : j + tile, i : i + tile] = x[i : i + tile, j : j + tile].T
    return out


def group_entries(cfg: NeoXConfig, group: str) -> list[Entry]:
    d, n, h, f, v = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    if group == "embed_in":
        return [Entry(group, ("embedding",), "gpt_neox.embed_in.weight", (v, d), _same, _same)]
    if group == "final_layer_norm":
        return [Entry(group, (p,), f"gpt_neox.final_layer_norm.{p}", (d,), _same, _same) for p in ("weight", "bias")]
    if group == "embed_out":  # [V, D] <-> kernel [D, V]
        return [Entry(group, ("kernel",), "embed_out.weight", (v, d), _t, _t)]
    i = int(group.split(".")[1])
    pre = f"gpt_neox.layers.{i}."
    out = []
    for ln in ("input_layernorm", "post_attention_layernorm"):
        out += [Entry(group, (ln, p), f"{pre}{ln}.{p}", (d,), _same, _same) for p in ("weight", "bias")]
    # query_key_value.weight [3D, D], rows per head [N, 3, H] -> kernel [D, N, 3, H]
    out.append(
        Entry(
            group,
            ("attention", "query_key_value", "kernel"),
            f"{pre}attention.query_key_value.weight",
            (3 * d, d),
            lambda w: _t(w).reshape(d, n, 3, h),
            lambda k: _t(k.reshape(d, 3 * d)),
        )
    )
    # dense.weight [D, D] ([out, in], in = N*H) -> kernel [N, H, D]
    out.append(
        Entry(
            group,
            ("attention", "dense", "kernel"),
            f"{pre}attention.dense.weight",
            (d, d),
            lambda w: _t(w).reshape(n, h, d),
            lambda k: _t(k.reshape(n * h, d)),
        )
    )
    if cfg.attention_bias:
        out.append(
            Entry(
                group,
                ("attention", "query_key_value", "bias"),
                f"{pre}attention.query_key_value.bias",
                (3 * d,),
                lambda b: b.reshape(n, 3, h),
                lambda b: b.reshape(3 * d),
            )
        )
        out.append(Entry(group, ("attention", "dense", "bias"), f"{pre}attention.dense.bias", (d,), _same, _same))
    out.append(Entry(group, ("mlp", "dense_h_to_4h", "kernel"), f"{pre}mlp.dense_h_to_4h.weight", (f, d), _t, _t))
    out.append(Entry(group, ("mlp", "dense_h_to_4h", "bias"), f"{pre}mlp.dense_h_to_4h.bias", (f,), _same, _same))
    out.append(Entry(group, ("mlp", "dense_4h_to_h", "kernel"), f"{pre}mlp.dense_4h_to_h.weight", (d, f), _t, _t))
    out.append(Entry(group, ("mlp", "dense_4h_to_h", "bias"), f"{pre}mlp.dense_4h_to_h.bias", (d,), _same, _same))
    return out


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree
