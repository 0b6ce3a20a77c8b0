"""The decode layout's matmul, kernel [O, I] times rows [M, I] -> [M, O] float32, in the form that runs fastest on XLA
CPU for the kernel's dtype and the number of rows (docs/performance.md, "Decode by batch"). A leaf: it imports nothing
of neox_jax.

Forms (`form(dtype, rows)`):
  dot          einsum("OI,MI->OM") in the kernel's dtype, float32 accumulation: float32 kernels, and bfloat16 /
               float16 ones over many rows (prefill).
  reduce       sum over I of kernel[O, I, 1] * rows^T[1, I, M], the kernel converted to float32 inside the fused
               loop: bfloat16 / float16 / int8 kernels over at most FEW_ROWS rows (decode). XLA CPU's dots convert
               such a kernel to a float32 copy first (an int8 [50304, 512] unembed: 24-32 ms against float32's 3.4);
               the fused reduce reads it as stored (3.0 ms at 2 rows). At a single row XLA turns the reduce back
               into a dot, so one row is padded to two here (the rest of the model keeps its one row).
  dequant-dot  the int8 kernel converted to the rows' dtype, then a dot: int8 over many rows, where the matmul is
               compute-bound and the conversion is paid once for all rows (today's stored-layout int8 product).

The products are the same in every form (a bfloat16 / float16 row times its kernel element, an int8 weight times the
row in the row's dtype: exact in float32); only the float32 summation order differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
LOW = (jnp.bfloat16, jnp.float16, jnp.int8)  # kernels XLA CPU's dots convert to float32 before multiplying
# At most this many rows keep their [O, M] result in memory before the transpose (left to itself XLA CPU folds the
# transpose into the product's output layout and takes a slower [M, O] kernel), and low-precision kernels take the
# reduce form: it beat the dot up to 64 rows and lost from 128 (pythia-70m shapes).
FEW_ROWS = 64
FORMS = ("dot", "reduce", "dequant-dot")


def form(dtype, rows: int) -> str:
    """The form for a kernel of this dtype over this many rows (see the module docstring)."""
    dtype = jnp.dtype(dtype)
    if dtype in LOW and rows <= FEW_ROWS:
        return "reduce"
    return "dequant-dot" if dtype == jnp.int8 else "dot"


def matmul_t(kernel, rows, how: str | None = None):
    """kernel [O, I] (float or int8), rows [M, I] -> [M, O] float32. Float kernels multiply the rows cast to their
    dtype; int8 kernels multiply the rows in the rows' own dtype (the scale is the caller's). how: a FORMS entry
    (None: `form`)."""
    m = rows.shape[0]
    how = how or form(kernel.dtype, m)
    if kernel.dtype != jnp.int8:
        rows = rows.astype(kernel.dtype)
    if how == "reduce" and m == 1:  # [2, I]: a zero row (see the module docstring), dropped from the result
        return matmul_t(kernel, jnp.pad(rows, ((0, 1), (0, 0))), how)[:1]
    if how == "reduce":  # [O, I, 1] * [1, I, M] summed over I; both in float32 inside the fused loop
        # One barrier over both: the rows' producers (layernorm, GELU, ...) stay out of the loop (fused in, they
        # ran once per output), and the kernel's conversion stays in it: in a decode while_loop XLA otherwise
        # hoists kernel.astype(float32) out as loop-invariant and every step reads a float32 copy.
        kernel, rows = jax.lax.optimization_barrier((kernel, rows.astype(F32).T))  # [O, I], [I, M]
        y = jnp.sum(kernel.astype(F32)[:, :, None] * rows[None], axis=1)  # [O, M]
    elif how == "dequant-dot":
        y = jnp.einsum("OI,MI->OM", kernel.astype(rows.dtype), rows, preferred_element_type=F32)  # [O, M]
    elif how == "dot":
        y = jnp.einsum("OI,MI->OM", kernel, rows, preferred_element_type=F32)  # [O, M]
    else:
        raise ValueError(f"unknown matmul form {how!r}; expected one of {FORMS}")
    if m <= FEW_ROWS:  # keep [O, M] in memory (see FEW_ROWS)
        y = jax.lax.optimization_barrier(y)
    return y.T  # [M, O]
