"""The decode layout's matmul, kernel [O, I] times rows [M, I] -> [M, O] float32, in the form that runs fastest on XLA
CPU for the kernel's dtype and the number of rows (docs/performance.md, "Decode by batch"). A leaf: it imports nothing
of neox_jax.

XLA CPU's dots convert a bfloat16 / float16 / int8 kernel to a float32 copy before multiplying (an int8 [50304, 512]
unembed: 24-32 ms against float32's 3.4). A fused multiply-and-sum converts each element inside its loop instead, so
the kernel is read as stored (3.0 ms). Forms (`form(dtype, rows)`), measured over a whole pythia-70m decode step:
  dot          einsum("OI,MI->OM") in the kernel's dtype, float32 accumulation: float32 and float16 kernels (XLA
               CPU's float16 was as slow in every form), bfloat16 over more than FEW_ROWS rows (prefill).
  reduce       sum over I of kernel[O, I, 1] * rows^T[1, I, M] -> [O, M]: bfloat16 over 2..FEW_ROWS rows.
  rowwise      sum over I of kernel[1, O, I] * rows[M, 1, I] -> [M, O]: bfloat16 at one row, int8 up to FEW_ROWS
               rows. An int8 kernel at one row gets a zero second row (at one row XLA turns this sum into a dot).
  dequant-dot  the int8 kernel converted to the rows' dtype, then a dot: int8 over more than FEW_ROWS rows, where the
               matmul is compute-bound and the conversion is paid once for all rows (the stored-layout int8 product).

The products are the same in every form (a bfloat16 / float16 row times its kernel element, an int8 weight times the
row in the row's dtype: exact in float32); only the float32 summation order differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
# At most this many rows keep a dot's [O, M] result in memory before the transpose (left to itself XLA CPU folds the
# transpose into the product's output layout and takes a slower [M, O] kernel), and low-precision kernels take the
# fused forms: they beat the dot up to 64 rows and lost from 128 (pythia-70m shapes).
FEW_ROWS = 64
FORMS = ("dot", "reduce", "rowwise", "dequant-dot")


def form(dtype, rows: int) -> str:
    """The form for a kernel of this dtype over this many rows (see the module docstring)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return "rowwise" if rows <= FEW_ROWS else "dequant-dot"
    if dtype == jnp.bfloat16 and rows <= FEW_ROWS:
        return "rowwise" if rows == 1 else "reduce"
    return "dot"


def _fused_inputs(kernel, rows):
    """One barrier over both: the rows' producers (layernorm, GELU, ...) stay out of the fused loop (fused in, they
    ran once per output), and the kernel's conversion stays in it (in a decode while_loop XLA otherwise hoists
    kernel.astype(float32) out as loop-invariant, and every step reads a float32 copy)."""
    return jax.lax.optimization_barrier((kernel, rows.astype(F32)))


def matmul_t(kernel, rows, how: str | None = None):
    """kernel [O, I] (float or int8), rows [M, I] -> [M, O] float32. Float kernels multiply the rows cast to their
    dtype; int8 kernels multiply the rows in the rows' own dtype (the scale is the caller's). how: a FORMS entry
    (None: `form`)."""
    m = rows.shape[0]
    how = how or form(kernel.dtype, m)
    if kernel.dtype != jnp.int8:
        rows = rows.astype(kernel.dtype)
    if how == "rowwise":
        if kernel.dtype == jnp.int8 and m == 1:  # [2, I]: a zero row, dropped from the result
            return matmul_t(kernel, jnp.pad(rows, ((0, 1), (0, 0))), how)[:1]
        kernel, rows = _fused_inputs(kernel, rows)
        return jnp.sum(kernel.astype(F32)[None] * rows[:, None, :], axis=-1)  # [M, O, I] summed over I: [M, O]
    if how == "reduce":
        kernel, rows = _fused_inputs(kernel, rows)
        y = jnp.sum(kernel.astype(F32)[:, :, None] * rows.T[None], axis=1)  # [O, I, M] summed over I: [O, M]
    elif how == "dequant-dot":
        y = jnp.einsum("OI,MI->OM", kernel.astype(rows.dtype), rows, preferred_element_type=F32)  # [O, M]
    elif how == "dot":
        y = jnp.einsum("OI,MI->OM", kernel, rows, preferred_element_type=F32)  # [O, M]
    else:
        raise ValueError(f"unknown matmul form {how!r}; expected one of {FORMS}")
    if m <= FEW_ROWS:  # keep [O, M] in memory (see FEW_ROWS)
        y = jax.lax.optimization_barrier(y)
    return y.T  # [M, O]
