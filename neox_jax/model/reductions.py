"""Reductions over the vocabulary axis, written around an XLA CPU slow path.

XLA CPU sums a fused exp(x - m) over rows as long as a vocabulary (50,304) at about half its speed over rows of a few
thousand (docs/performance.md, "vocab exp-sum"). So each row is cut into equal chunks (the largest divisor of its
length up to MAX_CHUNK: 8 chunks of 6,288 for 50,304) and the chunks' sums added; the optimization barrier keeps XLA
from folding the reshape back into one long-row reduction. The sum differs from the one-pass sum only by float32
summation order."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_CHUNK = 8192  # the widest chunk; rows up to this long are summed in one pass


def _chunk(v: int) -> int:
    """The largest divisor of v up to MAX_CHUNK (v itself when it is short enough; 1 when v has no useful one)."""
    if v <= MAX_CHUNK:
        return v
    return max(d for d in range(1, MAX_CHUNK + 1) if v % d == 0)


def sum_exp(x, m):
    """x [..., V] float32, m [..., 1] -> sum(exp(x - m), -1) [...]."""
    v = x.shape[-1]
    c = _chunk(v)
    if c == v or c < 256:
        return jnp.exp(x - m).sum(-1)
    rows = jax.lax.optimization_barrier(x.reshape(-1, c))  # [R * V/c, c]: a view of x, not a copy
    m_rows = jnp.repeat(m.reshape(-1, 1), v // c, axis=0)  # [R * V/c, 1]
    return jnp.exp(rows - m_rows).sum(-1).reshape(*x.shape[:-1], v // c).sum(-1)
