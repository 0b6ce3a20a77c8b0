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
  limbs        int8 up to LIMB_ROWS rows on CPUs with int8 dot instructions (VNNI: fast_int8_dot): each float32 row
               is split exactly into LIMBS int8 digits of one power-of-two scale (30 bits, past float32's 24-bit
               significand), and one int8 x int8 -> int32 dot of the kernel with all the digit rows reads the int8
               weights once; the exact int32 sums are recombined in float32. XLA CPU runs that dot at the int8
               weights' memory rate (a [50304, 512] kernel: 0.6 ms for 4 digit rows against float32's 1.5 ms for
               one row), where a fused loop converts each weight to float32 at float32's rate.

The products are the same in every form (a bfloat16 / float16 row times its kernel element, an int8 weight times the
row in the row's dtype: exact in float32); only the float32 summation order differs. limbs sums exactly (in int32) the
products of the weights with the row rounded to a multiple of 2^-30 max|row| at most (exact for every element of at
least max|row| / 64), which is nearer the exact product than a float32 summation.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

F32 = jnp.float32
# At most this many rows keep a dot's [O, M] result in memory before the transpose (left to itself XLA CPU folds the
# transpose into the product's output layout and takes a slower [M, O] kernel), and low-precision kernels take the
# fused forms: they beat the dot up to 64 rows and lost from 128 (pythia-70m shapes).
FEW_ROWS = 64
FORMS = ("dot", "reduce", "rowwise", "dequant-dot", "limbs")
LIMBS = 4  # int8 digits per row: 30 bits (the top digit in [-64, 64])
LIMB_BITS = 8 * (LIMBS - 1) + 6
# The most rows the limbs form takes: at 4 rows (16 digit rows) it lost to the rowwise form on most pythia-70m and
# pythia-1b kernels, at 1 and 2 it won on all but one (AMD Zen 5, AVX-512 VNNI; docs/performance.md).
LIMB_ROWS = 2
# ... and only kernels of at least this many weights, which stream from memory in a decode step: on smaller ones
# (pythia-70m's [2048, 512] and [512, 2048]) the fused forms and the dot were as fast, within the noise.
LIMB_MIN_WEIGHTS = 4 << 20
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni")  # x86 int8 dot-product instructions (/proc/cpuinfo flags)


@functools.cache
def fast_int8_dot() -> bool:
    """Whether this machine's CPU has int8 dot-product instructions (x86 VNNI), which XLA CPU's int8 x int8 dots use;
    without them (or where /proc/cpuinfo is absent) the limbs form is not chosen."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in INT8_DOT_FLAGS)


def form(dtype, rows: int, int8_dot: bool | None = None, weights: int = LIMB_MIN_WEIGHTS) -> str:
    """The form for a kernel of this dtype and this many weights over this many rows (see the module docstring);
    int8_dot: whether the CPU has fast int8 dots (None: fast_int8_dot())."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        big = weights >= LIMB_MIN_WEIGHTS
        if big and rows <= LIMB_ROWS and (fast_int8_dot() if int8_dot is None else int8_dot):
            return "limbs"
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
    how = how or form(kernel.dtype, m, weights=kernel.size)
    if how == "limbs":
        return _limbs(kernel, rows)
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


def limb_digits(rows):
    """rows [M, I] float -> (digits [LIMBS, M, I] int8, most significant first; exponent [M] int32) with
    rows ~= sum_k digits[k] * 2^(8 * (LIMBS - 1 - k)) * 2^(exponent - LIMB_BITS): each row scaled by a power of two
    (exact) so that max|row| < 2^LIMB_BITS, rounded to an integer (exact for elements >= max|row| / 64, else within
    2^-30 max|row|), and split into signed base-256 digits."""
    x = rows.astype(F32)
    _, e = jnp.frexp(jnp.max(jnp.abs(x), axis=-1))  # max|row| < 2^e
    e = e.astype(jnp.int32)
    n = jnp.round(jnp.ldexp(x, (LIMB_BITS - e)[:, None])).astype(jnp.int32)  # |n| <= 2^30
    digits = []
    for _ in range(LIMBS - 1):
        d = ((n + 128) & 255) - 128  # in [-128, 127]
        digits.append(d)
        n = (n - d) >> 8  # exact: n - d is a multiple of 256
    digits.append(n)  # the top digit: |n| <= 2^30 over 2^24, in [-64, 64]
    return jnp.stack(digits[::-1]).astype(jnp.int8), e


def _pow2(e):
    """2^e as two float32 factors [M] for int32 e [M] in [-252, 252] (one factor underflows below 2^-126)."""
    a = e // 2
    return tuple(jax.lax.bitcast_convert_type((f + 127) << 23, F32) for f in (a, e - a))


def _limbs(kernel, rows):
    """The limbs form (module docstring): kernel [O, I] int8, rows [M, I] -> [M, O] float32."""
    if kernel.dtype != jnp.int8:
        raise ValueError(f"the limbs form multiplies int8 kernels, not {kernel.dtype}")
    m, i = rows.shape
    digits, e = limb_digits(rows)
    acc = jnp.einsum("OI,RI->OR", kernel, digits.reshape(LIMBS * m, i), preferred_element_type=jnp.int32)
    acc = jax.lax.optimization_barrier(acc).reshape(-1, LIMBS, m).astype(F32)  # [O, LIMBS, M]: exact int32 sums
    y = acc[:, LIMBS - 1]
    for k in range(LIMBS - 2, -1, -1):  # least significant first; powers of two multiply exactly
        y = y + acc[:, k] * float(256 ** (LIMBS - 1 - k))
    a, b = _pow2(e - LIMB_BITS)
    y = y.T * a[:, None] * b[:, None]  # [M, O]
    finite = jnp.all(jnp.isfinite(rows), axis=-1, keepdims=True)  # (XLA CPU's max may drop a NaN)
    return jnp.where(finite, y, jnp.nan)  # a NaN / inf row stays non-finite, as in a float product
