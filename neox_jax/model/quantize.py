"""Quantizing GPT-NeoX param trees and checkpoints to int8 (the kernels and the modes: neox_jax/model/int8.py).

`quantize_tree` turns a float param tree (the whole model, or one checkpoint group) into its int8 form; `describe` /
`spec_from_metadata` go between a tree's int8 structure and a checkpoint's metadata; `cast_floats` casts the float
leaves only. The Linears it quantizes and their einsum layouts come from model.LINEARS.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from neox_jax.model.int8 import (
    DEFAULT_THRESHOLD,
    F32,
    MODES,
    QUANT_LEAVES,
    WEIGHT_FORMAT,
    QuantSpec,
    dequantize_weight,
    int8_einsum,
    is_quantized,
    lead_axes,
    map_linears,
    outlier_features,
    parse_spec,
    quantize_weight,
    quantize_weight_jit,
    spec_of,
)
from neox_jax.model.neox import LINEARS, int8_targets, quantize_module

__all__ = [
    "DEFAULT_THRESHOLD",
    "MODES",
    "QUANT_LEAVES",
    "WEIGHT_FORMAT",
    "QuantSpec",
    "cast_floats",
    "dequantize_weight",
    "describe",
    "int8_einsum",
    "int8_targets",
    "outlier_features",
    "param_bytes",
    "parse_spec",
    "quantize_module",
    "quantize_tree",
    "quantize_weight",
    "spec_from_metadata",
    "spec_of",
]


def _with_threshold(name, linear: dict, mode: str, threshold: float) -> dict:
    out = {k: v for k, v in linear.items() if k != "threshold"}
    if mode == "llm.int8":
        lead = lead_axes(linear["kernel"].ndim, LINEARS[name].einsum)
        out["threshold"] = jnp.full(linear["kernel"].shape[:lead], threshold, F32)
    return out


def quantize_tree(tree, mode: str, threshold: float = DEFAULT_THRESHOLD, embed_out: bool = False):
    """A float param tree (the whole model, stacked or not, or one checkpoint group) -> the quantized tree.
    An already quantized tree switches mode (int8 <-> llm.int8) without touching its weights."""
    targets = int8_targets(QuantSpec(mode, embed_out))

    def one(name, linear):
        if is_quantized(linear):  # every int8 Linear switches mode, whatever embed_out says
            return _with_threshold(name, linear, mode, threshold)
        if name not in targets:
            return linear
        q, scale = quantize_weight_jit(linear["kernel"], LINEARS[name].einsum)
        return _with_threshold(name, {**linear, "kernel": q, "scale": scale}, mode, threshold)

    return map_linears(tree, one)


def describe(params) -> dict[str, Any] | None:
    """checkpoint metadata["quantization"] for a param tree (None: not quantized)."""
    spec = spec_of(params)
    if spec is None:
        return None
    thresholds = []
    map_linears(params, lambda n, lin: thresholds.append(lin["threshold"]) if "threshold" in lin else None)
    threshold = float(jnp.max(jnp.asarray(thresholds[0]))) if thresholds else None
    return {
        "mode": spec.mode,
        "embed_out": spec.embed_out,
        "threshold": threshold,
        "targets": list(int8_targets(spec)),
        "weights": WEIGHT_FORMAT,
    }


def spec_from_metadata(meta: dict | None) -> QuantSpec | None:
    if not meta:
        return None
    return QuantSpec(meta["mode"], bool(meta.get("embed_out", False)))


def cast_floats(tree, dtype):
    """Casts the float params to dtype; int8 kernels and the float32 scales / thresholds stay as they are."""

    def cast(path, x):
        key = getattr(path[-1], "key", None) if path else None
        if key in QUANT_LEAVES or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, tree)


def param_bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
