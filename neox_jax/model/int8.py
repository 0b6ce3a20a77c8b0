"""The int8 kernels: weight-only int8 and LLM.int8() (Dettmers et al. 2022), in pure JAX. A leaf: it imports nothing
of neox_jax (quantize.py turns whole param trees and checkpoints into int8; model.py builds int8 Linears).

Which layers: the four block matrices (attention.query_key_value, attention.dense, mlp.dense_h_to_4h,
mlp.dense_4h_to_h), optionally embed_out. embed_in (a gather), biases and layernorms keep their float dtype.

Weights (both modes): symmetric int8 with one scale per output channel. A kernel keeps its layout ([D, N, 3, H] for
query_key_value, [N, H, D] for dense, ...): every Linear einsum here is `tokens + contracted, contracted + out ->
tokens + out`, so the absmax runs over the contracted (leading) kernel axes and the scale has the output axes:

    scale[o] = max_k |W[k, o]| / 127          (float32; [N, 3, H] for query_key_value, [D] for dense)
    Wq[k, o] = round(W[k, o] / scale[o])      (int8 in [-127, 127]; round half to even)

A quantized Linear's params are {"kernel": int8, "scale": float32, "bias": as before} plus, for llm.int8, a float32
scalar "threshold". The tree's structure says the mode, so `forward`, generation and sharding need no extra argument.

Modes, for x [tokens, K] (the contracted axes flattened) and output channels o:
  int8      y = (x @ Wq) * scale              the int8 kernel is converted to x's dtype inside the matmul, f32 accum.
  llm.int8  outlier features O = {k : max_t |x[t, k]| >= threshold} over every token of the call (the paper's
            "feature dimensions where at least one value exceeds the threshold"; >= as bitsandbytes). Then
              xr = x with the columns in O set to 0
              sx[t] = max_k |xr[t, k]| / 127;  xq = round(xr / sx[t]) (int8)
              y = (sx[t] * (xq @ Wq) + x[:, O] @ Wq[O, :]) * scale
            xq @ Wq is an int8 x int8 -> int32 matmul; the outlier term runs in x's dtype (float16 / bfloat16 for
            half models) against the rows of W dequantized from int8, as bitsandbytes does: only the int8 weights are
            kept, so memory stays at about half of fp16. Shapes are static under jit: O is a 0/1 feature mask, and the
            outlier term is the matmul of the masked x with the whole int8 kernel (zeros elsewhere) rather than a
            gather of a data-dependent number of columns; this costs a second pass over the int8 weights.
            One difference from bitsandbytes: it zeroes only the elements >= threshold before the per-token absmax
            (so the other values of an outlier column still count towards sx); we zero the whole outlier columns,
            which is the paper's decomposition and gives a tighter sx. As in bitsandbytes, the outlier set is taken
            over the whole batch of the call (padding tokens included).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32
MODES = ("int8", "llm.int8")
DEFAULT_THRESHOLD = 6.0
QUANT_LEAVES = ("scale", "threshold")  # float32 whatever the model's dtype
WEIGHT_FORMAT = "int8 symmetric, per-output-channel scale = absmax / 127 (float32)"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What is quantized and how (hashable: part of the jit-static graph): the mode, and whether embed_out is int8
    as well as the block linears (model.int8_targets). The threshold is a param leaf."""

    mode: str
    embed_out: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; expected one of {MODES}")


# ---- the einsum layout --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def parse_spec(spec: str) -> tuple[str, str, str]:
    """'BTNH,NHD->BTD' -> (tokens 'BT', contracted 'NH', out 'D'); insists on the [tokens+K] x [K+out] layout."""
    lhs, rest = spec.replace(" ", "").split(",")
    kspec, ospec = rest.split("->")
    contracted = "".join(c for c in kspec if c not in ospec)
    tokens = "".join(c for c in lhs if c not in contracted)
    out = "".join(c for c in kspec if c in ospec)
    if lhs != tokens + contracted or kspec != contracted + out or ospec != tokens + out:
        raise ValueError(f"einsum {spec!r}: int8 needs the layout tokens+contracted, contracted+out -> tokens+out")
    return tokens, contracted, out


def lead_axes(kernel_ndim: int, spec: str) -> int:
    """Leading axes in front of the spec's kernel axes ([L] for stacked layers)."""
    _, contracted, out = parse_spec(spec)
    return kernel_ndim - len(contracted) - len(out)


# ---- the algorithm --------------------------------------------------------------------------------------------------


def _inv127(absmax):
    """127 / absmax, and 0 where absmax == 0 (an all-zero row or column quantizes to zeros)."""
    return jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)


def quantize_weight(kernel, spec: str):
    """kernel [lead..., K..., O...] (float) -> int8 kernel of the same shape, float32 scale [lead..., O...]."""
    _, contracted, _ = parse_spec(spec)
    lead = lead_axes(kernel.ndim, spec)
    axes = tuple(range(lead, lead + len(contracted)))
    w = kernel.astype(F32)
    absmax = jnp.max(jnp.abs(w), axis=axes)
    q = jnp.round(w * jnp.expand_dims(_inv127(absmax), axes)).astype(jnp.int8)
    return q, absmax / 127.0


quantize_weight_jit = jax.jit(quantize_weight, static_argnames="spec")


def dequantize_weight(q, scale, spec: str, dtype=F32):
    _, contracted, _ = parse_spec(spec)
    lead = lead_axes(q.ndim, spec)
    return (q.astype(F32) * jnp.expand_dims(scale, tuple(range(lead, lead + len(contracted))))).astype(dtype)


def outlier_features(x, num_token_axes: int, threshold):
    """x [tokens..., K...] -> bool [K...]: the features where any token has |x| >= threshold."""
    return jnp.max(jnp.abs(x.astype(F32)), axis=tuple(range(num_token_axes))) >= threshold


def int8_einsum(spec: str, x, q, scale, threshold=None):
    """einsum(spec, x, W) with W = q * scale (per output channel). threshold None: weight-only int8; otherwise
    LLM.int8 (vector-wise int8 x int8 -> int32 plus the outlier features in x.dtype). Returns float32
    [tokens..., out...]."""
    tokens, contracted, out = parse_spec(spec)
    if threshold is None:
        return jnp.einsum(spec, x, q.astype(x.dtype), preferred_element_type=F32) * scale
    nt = len(tokens)
    xf = x.astype(F32)
    outlier = outlier_features(xf, nt, threshold)  # [K...] 0/1 feature mask
    xr = jnp.where(outlier, 0.0, xf)  # regular part
    row_max = jnp.max(jnp.abs(xr), axis=tuple(range(nt, x.ndim)), keepdims=True)  # [tokens..., 1...]
    xq = jnp.round(xr * _inv127(row_max)).astype(jnp.int8)
    acc = jnp.einsum(spec, xq, q, preferred_element_type=jnp.int32)  # [tokens..., out...]
    sx = (row_max / 127.0).reshape(x.shape[:nt] + (1,) * len(out))
    x_out = jnp.where(outlier, x, jnp.zeros((), x.dtype))  # outlier columns, in x's dtype
    y_out = jnp.einsum(spec, x_out, q.astype(x.dtype), preferred_element_type=F32)
    return (acc.astype(F32) * sx + y_out) * scale


def linear(lin, x, out_dtype=None):
    """model.Linear's forward when its kernel is int8 (lin.scale is set)."""
    threshold = None if lin.threshold is None else lin.threshold[...]
    y = int8_einsum(lin.spec, x, lin.kernel[...], lin.scale[...], threshold)
    if lin.bias is not None:
        y = y + lin.bias[...].astype(F32)
    return y.astype(out_dtype or x.dtype)


# ---- reading a param tree's structure ---------------------------------------------------------------------------


def map_linears(tree, fn, name=None):
    """Applies fn(name, linear_dict) to every {"kernel": ...} dict of a nested param dict (a whole tree or a group)."""
    if isinstance(tree, dict) and "kernel" in tree:
        return fn(name, tree)
    if isinstance(tree, dict):
        return {k: map_linears(v, fn, k if isinstance(k, str) else name) for k, v in tree.items()}
    return tree


def is_quantized(linear: dict) -> bool:
    return "scale" in linear


def spec_of(params) -> QuantSpec | None:
    """The QuantSpec a param tree is in (None: float), read from its structure; mixed modes are an error."""
    found: dict[str, set] = {}

    def see(name, linear):
        if is_quantized(linear):
            found.setdefault("llm.int8" if "threshold" in linear else "int8", set()).add(name)
        return linear

    map_linears(params, see)
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"param tree mixes quantization modes: {sorted(found)}")
    ((mode, names),) = found.items()
    return QuantSpec(mode, "embed_out" in names)
