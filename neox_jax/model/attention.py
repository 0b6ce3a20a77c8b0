"""Which attention runs for prefill, scoring and training, and the fused one: `jax.nn.dot_product_attention`.

    "plain"  the hand-written attention in model.py (`_attend`): scores [B, N, T, S] float32 in memory, long causal
             prompts in blocks of 128 queries. The fastest on XLA CPU (see CPU_CHOICE); the decode step (with a KV
             cache) always runs it.
    "xla"    jax.nn.dot_product_attention(implementation="xla"): the same math as XLA ops (scores float32, softmax
             float32), in the [B, T, N, H] layout the projections produce, so no transposes around it.
    "cudnn"  jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused (flash) kernel, nothing [T, S]-sized
             in memory but the mask; float16 / bfloat16 only, head dim a multiple of 8 and at most 128 (256 on
             Hopper); softmax in float32 inside the kernel.

`choose(None, ...)` picks per backend: cudnn on GPU where the dtype and head dim allow, else xla; plain on CPU. The
choice is an explicit argument (`model_from_params(..., attention=)`, `forward`, `scoring.score_rows`,
`decode.Layout.attention`), never a global or an environment variable: jitted functions take it as a static argument,
so a compiled program is keyed on the attention it runs and forcing another one recompiles instead of silently
reusing the old program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("plain", "xla", "cudnn")
# XLA CPU, a 1023-token prefill (scripts/benchmark.py gpu on CPU, one process, 2 loaded cores; docs/gpu.md): bfloat16
# pythia-160m 36.4 tokens/s plain vs 29.2 through dot_product_attention; float32 within noise (165 vs 151 for 70m,
# 53.5 vs 56.6 for 160m). Nothing faster, so CPU keeps the plain path.
CPU_CHOICE = "plain"
CAUSAL_BLOCK = 128  # queries per block in a long prompt (plain and xla): a block never multiplies keys after its end


def cudnn_supports(dtype, head_dim: int) -> bool:
    """cuDNN's fused attention: half precision, head dim a multiple of 8 and <= 128 (every Pythia / 20B head: 64,
    80, 96, 128)."""
    return jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) and head_dim % 8 == 0 and head_dim <= 128


def choose(requested: str | None, dtype, head_dim: int, backend: str | None = None) -> str:
    """requested: None (pick for the backend) or one of IMPLEMENTATIONS. backend: default jax.default_backend()."""
    if requested is not None:
        if requested not in IMPLEMENTATIONS:
            raise ValueError(f"attention {requested!r} is not one of {IMPLEMENTATIONS} (or None: per backend)")
        return requested
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return CPU_CHOICE
    if backend in ("gpu", "cuda") and cudnn_supports(dtype, head_dim):
        return "cudnn"
    return "xla"


def fused(q, k, v, mask, implementation: str, causal: bool):
    """q [B, T, N, H] over k, v [B, S, N, H] under mask [B, T, S] bool -> [B, T, N, H] in q's dtype.

    causal: the mask hides every key after its query (T == S; true of every mask the model builds without `rows`,
    the scorer's tree masks included): cuDNN then skips the blocks above the diagonal, and XLA's path runs long
    prompts in causal blocks like the plain one. The scores and softmax are float32 in both (XLA: a float32
    QK^T product and softmax, probabilities rounded to v's dtype for the PV product; cuDNN: float32 inside the
    kernel). A row with no visible key (a left-padding query) gets a finite uniform average, as in the plain path."""
    if implementation == "cudnn":
        # the boolean mask becomes an additive bias [B, 1, T, S] in q's dtype (finite: no NaN for empty rows)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=causal, implementation="cudnn")
    t = q.shape[1]
    if causal and t >= 2 * CAUSAL_BLOCK and t % CAUSAL_BLOCK == 0:  # a long prompt: blocks of queries
        return jnp.concatenate(
            [
                _xla(q[:, e - CAUSAL_BLOCK : e], k[:, :e], v[:, :e], mask[:, e - CAUSAL_BLOCK : e, :e])
                for e in range(CAUSAL_BLOCK, t + 1, CAUSAL_BLOCK)
            ],
            axis=1,
        )
    return _xla(q, k, v, mask)


def _xla(q, k, v, mask):
    if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
        # its float16 QK^T asks for an F16_F16_F32 dot, which XLA CPU cannot lower under jit: run it in float32
        return _xla(*(a.astype(jnp.float32) for a in (q, k, v)), mask).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
