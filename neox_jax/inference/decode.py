"""How params and the KV cache are laid out for decoding on a backend (`Layout`, `layout_for`, `transpose_kernels`).
The compiled prefill / decode programs over that layout are the decode core, neox_jax/inference/core.py.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from neox_jax.model import int8
from neox_jax.model.neox import LINEARS, Params, kernel_in_dims, transpose_kernel


class Layout(NamedTuple):
    transposed: bool  # params from transpose_kernels (below): matmuls as kernel @ x^T
    cache_dtype: str
    min_rows: int = 1  # matmuls get at least this many rows (batch rows in decode, positions for the prefill logits)
    attention: str | None = None  # the prefill's attention: None per backend, or "plain" / "xla" / "cudnn"


def transpose_kernels(params: Params) -> Params:
    """Every Linear kernel [in dims..., out dims...] as one [out, in] matrix (see Linear; stacked: [L, out, in]);
    the other leaves are shared. embed_out [D, V] -> [V, D]; query_key_value [D, N, 3, H] -> [N*3*H, D];
    dense [N, H, D] -> [D, N*H]. An int8 kernel stays int8 and its scale [out dims...] becomes [O] (stacked:
    [L, O]), in the order of the kernel's rows. A copy of every matrix: the caller holds both layouts."""

    def fix(tree, name=None):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = fix(v, k)
            elif k == "kernel" and name in LINEARS:
                out[k] = transpose_kernel(name, v)
            elif k == "scale" and name in LINEARS:  # [..., out dims...] -> [..., O]
                n_out = len(LINEARS[name].kernel_axes) - kernel_in_dims(name)
                out[k] = v.reshape(*v.shape[: v.ndim - n_out], -1)
            else:
                out[k] = v
        return out

    return fix(params)


def compute_dtype(params: Params):
    return params["embed_in"]["embedding"].dtype


def layout_for(params: Params, backend: str) -> Layout:
    """What runs fastest on XLA CPU (docs/performance.md): [out, in] kernels (PyTorch's layout: faster small-batch
    matmuls, and the layout in which bf16 / f16 / weight-only int8 kernels are read as stored: model/rowmatmul.py)
    and a float32 cache whatever the params (XLA CPU's bf16 attention converted the whole cache to float32 every
    step). Elsewhere (and for llm.int8, whose outlier split runs on the stored layout): the params as stored and a
    cache in their dtype: GPUs keep their native dots."""
    spec = int8.spec_of(params)
    if backend == "cpu" and (spec is None or spec.mode == "int8"):
        return Layout(True, "float32")
    return Layout(False, jnp.dtype(compute_dtype(params)).name)
