"""The GPT-NeoX module tree in Flax NNX, with Hugging Face GPT-NeoX names.

    GPTNeoX
      embed_in                 Embed     embedding [V, D]
      layers[i]                Block
        input_layernorm        LayerNorm weight, bias [D]
        post_attention_layernorm
        attention
          query_key_value      Linear    kernel [D, N, 3, H], bias [N, 3, H]  (HF packs q, k, v per head)
          dense                Linear    kernel [N, H, D], bias [D]
        mlp
          dense_h_to_4h        Linear    kernel [D, F], bias [F]
          dense_4h_to_h        Linear    kernel [F, D], bias [D]
      final_layer_norm         LayerNorm
      embed_out                Linear    kernel [D, V]  (untied)

Shape letters: B batch, T query tokens, S key/value slots, D hidden, N heads, H head dim, R rotary dims, F mlp, V vocab.

Functional core: `init_params` gives a plain nested dict of arrays and `forward(params, ...)` merges it into the module
tree under jit. The layers are separate buffers by default (`layers` = {0: ..., 1: ...}; unrolled, which decodes fastest
on CPU); `stack_layers` turns them into one stacked buffer per weight ([L, ...]) that runs under `lax.scan`, for a
compile time flat in depth. Precision: parameters in their own dtype; layernorm statistics, QK^T, softmax and logits in
float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from neox_jax.model import attention, int8, rowmatmul
from neox_jax.model.config import NeoXConfig

Params = dict[str, Any]
F32 = jnp.float32


class LinearSpec(NamedTuple):
    parent: str  # the block submodule that holds it ("" for embed_out, which is not in a block)
    einsum: str  # tokens + contracted, contracted + out -> tokens + out (the layout int8 scales rely on)
    kernel_axes: tuple[str, ...]  # logical axis names (sharding.RULES maps them to mesh axes)
    bias_axes: tuple[str, ...]


# The linear layers, by their checkpoint names: the one table the modules, int8 (quantize.py), the decoder's
# transposed layout (decode.py) and fine-tuning's transposed copies (finetune.py) read.
LINEARS = {
    "query_key_value": LinearSpec(
        "attention", "BTD,DNKH->BTNKH", ("embed", "heads", "qkv", "head_dim"), ("heads", "qkv", "head_dim")
    ),
    "dense": LinearSpec("attention", "BTNH,NHD->BTD", ("heads", "head_dim", "embed"), ("norm",)),
    "dense_h_to_4h": LinearSpec("mlp", "BTD,DF->BTF", ("embed", "mlp"), ("mlp",)),
    "dense_4h_to_h": LinearSpec("mlp", "BTF,FD->BTD", ("mlp", "embed"), ("norm",)),
    "embed_out": LinearSpec("", "BTD,DV->BTV", ("embed", "vocab"), ()),
}
BLOCK_LINEARS = tuple(name for name, spec in LINEARS.items() if spec.parent)


def kernel_in_dims(name: str) -> int:
    """How many leading kernel dims the Linear `name` contracts (query_key_value 1, dense 2, ...)."""
    lhs, rest = LINEARS[name].einsum.split(",")
    return len(set(lhs) & set(rest.split("->")[0]))


def transpose_kernel(name: str, kernel):
    """One Linear kernel [(L,) in dims..., out dims...] as an [(L,) out, in] matrix (PyTorch's layout)."""
    n_in, ndim = kernel_in_dims(name), len(LINEARS[name].kernel_axes)
    stack, inner = kernel.shape[: kernel.ndim - ndim], kernel.shape[kernel.ndim - ndim :]
    flat = kernel.reshape(*stack, math.prod(inner[:n_in]), math.prod(inner[n_in:]))  # [..., I, O]
    return jnp.swapaxes(flat, -1, -2)  # [..., O, I]


def _hook(module, name: str, x):
    """A hook point (neox_jax/interp/run.py, TransformerLens names): x itself unless interp set `module.hook`, so the
    default forward traces exactly as without it."""
    return x if module.hook is None else module.hook(name, x)


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)


# Activation checkpointing per block (training: --remat). "full" keeps only each block's input and recomputes the
# block in the backward pass; "dots" also keeps every Linear's output (LINEAR_OUT): the projections are not recomputed,
# the elementwise work, layernorms and attention core (its [B, N, T, T] scores included) are. None: keep everything.
LINEAR_OUT = "linear_out"
REMAT = {
    "none": None,
    "dots": jax.checkpoint_policies.save_only_these_names(LINEAR_OUT),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def remat_block(fn, remat: str, prevent_cse: bool = True):
    """fn (a block's forward) under jax.checkpoint with the REMAT policy `remat` ("none": fn itself)."""
    if remat not in REMAT:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {list(REMAT)}")
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT[remat], prevent_cse=prevent_cse)


class LayerNorm(nnx.Module):
    hook = None  # see Attention.hook: hook_scale and hook_normalized, TransformerLens's (before weight and bias)

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("norm",))

    def __call__(self, x):  # [..., D] -> [..., D] (x.dtype); statistics in float32
        x32 = x.astype(F32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        if self.hook is None:
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        else:  # TransformerLens: scale [..., 1] = sqrt(var + eps), normalized = centered / scale (an edit flows on)
            scale = _hook(self, "hook_scale", jnp.sqrt(var + self.eps))
            y = _hook(self, "hook_normalized", (x32 - mean) / scale)
        return (y * self.weight[...].astype(F32) + self.bias[...].astype(F32)).astype(x.dtype)


@jax.custom_vjp
def matmul_f32(x, w, w_t=None):
    """[M, I] @ [I, O] with float32 accumulation and a float32 result, for operands in any one dtype; w_t: None or
    the same weights as an [O, I] array, for the input-gradient product.

    Differentiated as mixed-precision training does it (and torch's bf16 / fp16 autograd): the result's cotangent is
    cast to the operands' dtype, so the gradient products run in that dtype too, again accumulating in float32.
    Autodiff of a plain dot would multiply the float32 cotangent by the weights converted to float32: a float32
    matmul plus a conversion of every weight matrix per step. In float32 this is exactly the plain dot's gradient.

    XLA CPU runs a bfloat16 product at its bfloat16 speed only when neither operand is transposed: for any other
    orientation it converts both to float32 first. So the input gradient g @ w^T is computed as g @ w_t when a
    physically transposed copy is given (`Linear.kernel_t`: frozen weights in bfloat16 training on CPU)."""
    return jnp.dot(x, w, preferred_element_type=F32)


def _matmul_f32_fwd(x, w, w_t):
    return matmul_f32(x, w, w_t), (x, w, w_t)


def _matmul_f32_bwd(res, g):  # g [M, O] float32
    x, w, w_t = res
    g = g.astype(x.dtype)
    dx = jnp.dot(g, w.T if w_t is None else w_t, preferred_element_type=F32).astype(x.dtype)
    dw = jnp.dot(x.T, g, preferred_element_type=F32).astype(w.dtype)
    return dx, dw, None


matmul_f32.defvjp(_matmul_f32_fwd, _matmul_f32_bwd)


class LoraAdapter:
    """What model.Linear adds to its float32 product: scale * (dropout(x) @ A) @ B. key: None (no dropout: evaluation
    and inference) or the PRNG key of this Linear for this step."""

    def __init__(self, a, b, spec, key=None):
        self.a, self.b, self.spec, self.key = a, b, spec, key

    def __call__(self, x, n_in: int):  # x [..., in dims] -> [..., out dims] float32
        lead, r = x.shape[: x.ndim - n_in], self.a.shape[-1]
        rows = x.reshape(-1, math.prod(self.a.shape[:-1])).astype(F32)  # [M, I]
        p = self.spec.dropout
        if p and self.key is not None:  # torch.nn.Dropout: zero with probability p, scale the rest by 1 / (1 - p)
            keep = jax.random.bernoulli(self.key, 1.0 - p, rows.shape)
            rows = jnp.where(keep, rows / (1.0 - p), 0.0)
        h = jnp.dot(rows, self.a.reshape(-1, r).astype(F32), preferred_element_type=F32)  # [M, r]
        y = jnp.dot(h, self.b.reshape(r, -1).astype(F32), preferred_element_type=F32) * self.spec.scale  # [M, O]
        return y.reshape(*lead, *self.b.shape[1:])


class Linear(nnx.Module):
    """y = einsum(spec, x, kernel) + bias, with the kernel laid out one axis per meaning: [in dims..., out dims...].

    `transposed` (set by model_from_params(..., transposed=True), for params from decode.transpose_kernels): the
    kernel is one [out, in] matrix (PyTorch's layout) and the product is computed as kernel @ x^T, weights on the
    left: XLA CPU's small-batch matmuls pack the right-hand operand, here the few activations instead of the weights
    (docs/performance.md). Its form per dtype and row count is rowmatmul.form's; a weight-only int8 kernel is
    [O, I] int8 with its scale flattened to [O]."""

    transposed = False
    kernel_t = None  # an [O, I] copy of a frozen kernel for the backward pass (see matmul_f32), or None
    lora = None  # a lora.Adapter (set by model_from_params from "lora_A" / "lora_B" entries), or None

    def __init__(
        self,
        spec: str,
        kernel_shape,
        kernel_axes,
        bias_shape,
        bias_axes,
        *,
        use_bias: bool,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.spec = spec
        self.n_in = len(set(spec.split(",")[0]) & set(spec.split(",")[1].split("->")[0]))  # contracted kernel dims
        self.out_shape = tuple(kernel_shape[self.n_in :])
        self.kernel = nnx.Param(_init(rngs, kernel_shape, param_dtype), axes=kernel_axes)
        self.bias = nnx.Param(jnp.zeros(bias_shape, param_dtype), axes=bias_axes) if use_bias else None
        self.scale = self.threshold = None  # int8 kernels: set by quantize_module (below)

    def __call__(self, x, out_dtype=None):
        """Accumulates in float32 whatever the parameter dtype (also what makes XLA CPU pick its fast bf16 matmul:
        with a bf16 result it took a path 2-5x slower), then returns out_dtype (default: the kernel's dtype)."""
        if self.scale is not None and not self.transposed:
            return int8.linear(self, x, out_dtype)
        kernel = self.kernel[...]
        lead = x.shape[: x.ndim - self.n_in]
        if self.transposed:  # kernel [O, I]; x [..., in dims] -> [..., out dims]
            if self.threshold is not None:
                raise ValueError("llm.int8 kernels run in their stored layout (decode.layout_for), not transposed")
            rows = x.reshape(-1, kernel.shape[1])  # [M, I]
            y = rowmatmul.matmul_t(kernel, rows)  # [M, O] float32
            if self.scale is not None:  # weight-only int8: scale [O]
                y = y * self.scale[...]
            y = y.reshape(*lead, *self.out_shape)
        else:  # one 2-D matmul [M, I] @ [I, O]: with several contracted or output axes (query_key_value's
            # [D, N, 3, H]) XLA CPU copied the kernel into a transposed [O, I] buffer for every backward product
            rows = x.reshape(-1, math.prod(kernel.shape[: self.n_in])).astype(kernel.dtype)  # [M, I]
            y = matmul_f32(rows, kernel.reshape(rows.shape[1], -1), self.kernel_t)  # [M, O]
            y = y.reshape(*lead, *self.out_shape)
        if self.lora is not None:  # + scale * (dropout(x) @ A) @ B, unmerged, in float32 (neox_jax/model/lora.py)
            y = y + self.lora(x, self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(F32)
        dtype = out_dtype or (x.dtype if self.scale is not None else kernel.dtype)  # int8: the activations'
        return checkpoint_name(y.astype(dtype), LINEAR_OUT)  # kept by --remat dots


def _linear(name: str, kernel_shape, bias_shape, **kw) -> Linear:
    """The Linear `name` of LINEARS, with these sizes."""
    spec = LINEARS[name]
    return Linear(spec.einsum, kernel_shape, spec.kernel_axes, bias_shape, spec.bias_axes, **kw)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_init(rngs, (vocab, dim), param_dtype), axes=("vocab", "embed"))

    def __call__(self, ids):  # [B, T] int -> [B, T, D]
        return jnp.take(self.embedding[...], ids, axis=0)


def rotary_cos_sin(positions, rotary_dims: int, base: float):
    """positions [B, T] -> cos, sin [B, T, R] in float32 (GPT-NeoX's rotate-half layout: frequencies repeated twice)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dims, 2, dtype=F32) / rotary_dims))  # [R/2]
    freqs = positions.astype(F32)[..., None] * inv_freq  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, R]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x, cos, sin):
    """x [B, T, N, H]: rotates the first R features of each head, passes the rest through."""
    r = cos.shape[-1]
    rot, rest = x[..., :r].astype(F32), x[..., r:]
    x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)


CAUSAL_BLOCK = attention.CAUSAL_BLOCK  # queries per block in a long prefill: never a key after its last query


def _attend(q, k, v, new_mask, old_mask=None, kv=None):
    """q [B, N, T, H] over the new keys / values k, v [B, N, U, H] (mask [B, T, U]) and, with old_mask [B, T, S],
    the slots of the cache kv. One float32 softmax over both. Returns [B, N, T, H] float32."""
    scores = jnp.einsum("BNTH,BNUH->BNTU", q, k, preferred_element_type=F32)  # U: the new tokens
    scores = jnp.where(new_mask[:, None], scores, jnp.finfo(F32).min)
    if old_mask is not None:  # and the slots already in the cache
        q_old = q.astype(jnp.promote_types(q.dtype, kv[0].dtype))
        old = jnp.einsum("BNTH,BNSH->BNTS", q_old, kv[0], preferred_element_type=F32)
        scores = jnp.concatenate([jnp.where(old_mask[:, None], old, jnp.finfo(F32).min), scores], axis=-1)
    probs = jax.nn.softmax(scores * q.shape[-1] ** -0.5, axis=-1)  # [B, N, T, (S +) U] float32
    # a plain batched matmul to [B, N, T, H] (with the transpose folded in, XLA CPU fell back to a slow kernel)
    u = k.shape[2]
    out = jnp.einsum("BNTU,BNUH->BNTH", probs[..., -u:].astype(v.dtype), v, preferred_element_type=F32)
    if old_mask is not None:
        out = out + jnp.einsum(
            "BNTS,BNSH->BNTH", probs[..., :-u].astype(kv[1].dtype), kv[1], preferred_element_type=F32
        )
    return out


@jax.custom_vjp
def split_qkv(qkv):
    """[B, T, N, 3, H] -> q, k, v [B, T, N, H]. Its gradient stacks the three back into one [B, T, N, 3, H] array:
    autodiff of the three slices padded each gradient to full size and added them (docs/performance.md)."""
    return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]


split_qkv.defvjp(lambda qkv: (split_qkv(qkv), None), lambda _, g: (jnp.stack(g, axis=-2),))


class Attention(nnx.Module):
    hook = None  # set by neox_jax.interp: its hook points, and the attention computed with scores and pattern
    implementation = None  # without cache slots to read: None (per backend) or one of attention.IMPLEMENTATIONS

    def __init__(self, cfg: NeoXConfig, *, param_dtype, rngs: nnx.Rngs):
        d, n, h = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.query_key_value = _linear(
            "query_key_value", (d, n, 3, h), (n, 3, h), use_bias=cfg.attention_bias, param_dtype=param_dtype, rngs=rngs
        )
        self.dense = _linear("dense", (n, h, d), (d,), use_bias=cfg.attention_bias, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv, cache_index, rows=None):
        """x [B, T, D]; kv None or (k, v) caches [B, N, S, H]; mask [B, T, T] bool for the T new tokens, and with a
        cache also [B, T, S] for the slots already written (None when cache_index is the static 0: no old slots).
        The new keys / values are written at slots cache_index.. and returned as the updated (k, v) (or None).
        rows [B, K] int (no cache): only these tokens query, and the output is theirs, [B, K, D] (keys and values
        come from all T).

        Written for XLA CPU decode speed: heads before slots in the cache, so both attention einsums are plain
        batched matmuls over (B, N); the old cache is read before the new tokens are written (attention over the old
        slots and over the new tokens, one softmax), so the update is the cache's last use and XLA makes it in place
        without copying the cache; `dense`, like every Linear, multiplies the attention output as one [B*T, N*H]
        matrix, so XLA never transposes the dense kernel to match it. A cache wider than the activations (a float32
        cache for bf16 params) is read as it is, with q widened instead: XLA CPU converted the whole cache every step
        otherwise. Without old cache slots (prefill, scoring, training) the attention is `self.implementation`
        (see neox_jax/model/attention.py: jax.nn.dot_product_attention, fused by cuDNN on GPU); decode steps run the
        plain path."""
        t = x.shape[1]
        qkv = self.query_key_value(x)  # [B, T, N, 3, H]
        q, k, v = (_hook(self, f"hook_{a}", b) for a, b in zip("qkv", split_qkv(qkv)))  # [B, T, N, H]
        q, k = (_hook(self, f"hook_rot_{a}", apply_rotary(b, cos, sin)) for a, b in (("q", q), ("k", k)))
        new_mask, old_mask = mask
        impl = attention.choose(self.implementation, q.dtype, q.shape[-1])
        if old_mask is None and impl != "plain" and self.hook is None:  # (interp computes its own scores / pattern)
            return self._fused(x, q, k, v, new_mask, kv, cache_index, rows, impl)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, N, T, H]
        if rows is not None:  # [B, N, K, H] queries, [B, K, T] mask
            q = jnp.take_along_axis(q, rows[:, None, :, None], axis=2)
            new_mask = jnp.take_along_axis(new_mask, rows[:, :, None], axis=1)
        if kv is not None:  # what the cache holds (the new part below uses exactly these values)
            k, v = k.astype(kv[0].dtype).astype(k.dtype), v.astype(kv[1].dtype).astype(v.dtype)
        if self.hook is not None:  # interpretability: the scores and pattern computed explicitly, with their hooks
            out = self.hook.attend(q, k, v, new_mask, old_mask, rows)
        elif rows is None and old_mask is None and t >= 2 * CAUSAL_BLOCK and t % CAUSAL_BLOCK == 0:  # a long prompt
            ends = range(CAUSAL_BLOCK, t + 1, CAUSAL_BLOCK)
            out = jnp.concatenate(
                [
                    _attend(
                        q[:, :, e - CAUSAL_BLOCK : e], k[:, :, :e], v[:, :, :e], new_mask[:, e - CAUSAL_BLOCK : e, :e]
                    )
                    for e in ends
                ],
                axis=2,
            )
        else:
            out = _attend(q, k, v, new_mask, old_mask, kv)
        out = _hook(self, "hook_z", out.transpose(0, 2, 1, 3))  # [B, T, N, H]
        if kv is not None:
            kv = tuple(
                jax.lax.dynamic_update_slice(c, a.astype(c.dtype), (0, 0, cache_index, 0)) for c, a in zip(kv, (k, v))
            )
        return self.dense(out.astype(x.dtype)), kv

    def _fused(self, x, q, k, v, mask, kv, cache_index, rows, impl):
        """__call__ without old cache slots through jax.nn.dot_product_attention: q, k, v [B, T, N, H] as the
        projection made them (no transposes but the cache write's), mask [B, T, T]."""
        if rows is not None:  # [B, K, N, H] queries, [B, K, T] mask
            q = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
            mask = jnp.take_along_axis(mask, rows[:, :, None], axis=1)
        if kv is not None:  # what the cache holds (attention uses exactly these values), [B, N, S, H] slots
            k, v = k.astype(kv[0].dtype).astype(k.dtype), v.astype(kv[1].dtype).astype(v.dtype)
            kv = tuple(
                jax.lax.dynamic_update_slice(c, a.transpose(0, 2, 1, 3).astype(c.dtype), (0, 0, cache_index, 0))
                for c, a in zip(kv, (k, v))
            )
        out = attention.fused(q, k, v, mask, impl, causal=rows is None)  # [B, T, N, H]
        return self.dense(out.astype(x.dtype)), kv


def gelu(x, approximate: bool):
    """GELU in x's dtype. The exact form as PyTorch writes it, 0.5 x (1 + erf(x / sqrt 2)): jax.nn.gelu's erfc form
    evaluates both of erfc's branches, several times slower on XLA CPU (docs/performance.md), for a difference from
    torch's float32 GELU no larger than its own (1.4e-6 at |x| < 10)."""
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


class MLP(nnx.Module):
    hook = None  # see Attention.hook

    def __init__(self, cfg: NeoXConfig, *, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.approximate = cfg.hidden_act != "gelu"
        self.relu = cfg.hidden_act == "relu"
        self.dense_h_to_4h = _linear("dense_h_to_4h", (d, f), (f,), use_bias=True, param_dtype=param_dtype, rngs=rngs)
        self.dense_4h_to_h = _linear("dense_4h_to_h", (f, d), (d,), use_bias=True, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        h = _hook(self, "hook_pre", self.dense_h_to_4h(x))
        h = jax.nn.relu(h) if self.relu else gelu(h.astype(F32), self.approximate).astype(x.dtype)
        return self.dense_4h_to_h(_hook(self, "hook_post", h))


class Block(nnx.Module):
    hook = None  # see Attention.hook

    def __init__(self, cfg: NeoXConfig, *, param_dtype, rngs: nnx.Rngs):
        self.parallel = cfg.use_parallel_residual
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.attention = Attention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv, cache_index, rows=None):
        """rows [B, K] (see Attention): the block's output at those tokens only, [B, K, D]."""
        x = _hook(self, "hook_resid_pre", x)
        attn, kv = self.attention(self.input_layernorm(x), cos, sin, mask, kv, cache_index, rows)
        attn = _hook(self, "hook_attn_out", attn)
        if rows is not None:
            x = jnp.take_along_axis(x, rows[..., None], axis=1)  # [B, K, D]
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            x = x + attn + self._mlp(x)
        else:  # x + attn(ln1(x)), then + mlp(ln2(.))
            x = _hook(self, "hook_resid_mid", x + attn)
            x = x + self._mlp(x)
        return _hook(self, "hook_resid_post", x), kv

    def _mlp(self, x):  # [B, T, D] -> mlp(ln2(x)) [B, T, D]
        return _hook(self, "hook_mlp_out", self.mlp(self.post_attention_layernorm(x)))


def _take_extras(layers) -> list:
    """Detaches the stacked Linears' kernel_t / lora (arrays are not nnx state): [(path, kernel_t, lora)]."""
    found = []
    for path, m in nnx.iter_modules(layers):
        if isinstance(m, Linear) and (m.kernel_t is not None or m.lora is not None):
            found.append((tuple(path), m.kernel_t, m.lora))
            m.kernel_t = m.lora = None
    return found


def _put_extras(layers, extras: list, layer_extras=None, i=None) -> None:
    """Re-attaches _take_extras' arrays: all layers' (layer_extras None) or layer i's slices, with the LoRA dropout
    key folded with the layer index too."""
    modules = dict((tuple(p), m) for p, m in nnx.iter_modules(layers))
    for j, (path, kernel_t, lora) in enumerate(extras):
        m = modules[path]
        if layer_extras is None:
            m.kernel_t, m.lora = kernel_t, lora
            continue
        m.kernel_t, ab = layer_extras[j]
        if lora is not None:
            key = None if lora.key is None else jax.random.fold_in(lora.key, i)
            m.lora = LoraAdapter(ab[0], ab[1], lora.spec, key)


class GPTNeoX(nnx.Module):
    hook = None  # see Attention.hook
    remat = "none"  # activation checkpointing of each block without a cache (REMAT; set by model_from_params)

    def __init__(self, cfg: NeoXConfig, *, param_dtype=F32, rngs: nnx.Rngs, stacked: bool = False):
        self.embed_in = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
        if stacked:

            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=0, out_axes=0)
            def make(r):
                return Block(cfg, param_dtype=param_dtype, rngs=r)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List(
                [Block(cfg, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
            )
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.embed_out = _linear(
            "embed_out", (cfg.hidden_size, cfg.vocab_size), (), use_bias=False, param_dtype=param_dtype, rngs=rngs
        )
        self.rotary_dims = cfg.rotary_dims
        self.rotary_base = cfg.rotary_emb_base

    def hidden_states(self, input_ids, positions, kv_valid, cache=None, cache_index=0, attn_mask=None, rows=None):
        """input_ids, positions [B, T] int; kv_valid [B, S] bool (which key slots hold real tokens, S == T without a
        cache); cache None or {"k", "v"}: a list of L [B, N, S, H] buffers
        (unrolled layers) or one [L, B, N, S, H] buffer (stacked layers), written at slots cache_index..cache_index+T-1.
        attn_mask: without a cache, an explicit [B, T, T] mask replacing causal & kv_valid (packed sequences).
        rows [B, K] int, without a cache: only these tokens' states are wanted, and the last layer computes its
        queries, attention output and MLP for them alone (a scorer's few scored positions).
        Returns the final-layernormed hidden states [B, T, D] ([B, K, D] with rows) and the updated cache (or None)."""
        if rows is not None and cache is not None:
            raise ValueError("rows is only for a forward pass without a KV cache")
        b, t, s = *input_ids.shape, kv_valid.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))  # [T, T]
        if attn_mask is not None:
            if cache is not None:
                raise ValueError("attn_mask is only for a forward pass without a KV cache")
            mask = (attn_mask, None)
        elif cache is None:
            mask = (kv_valid[:, None, :] & causal, None)
        else:  # the new tokens' own slots, and the real slots written before them
            new_valid = jax.lax.dynamic_slice(kv_valid, (0, cache_index), (b, t))  # [B, T]
            old = None
            if not (isinstance(cache_index, int) and cache_index == 0):
                old = kv_valid[:, None, :] & (jnp.arange(s) < cache_index)[None, None, :]  # [B, 1, S]
                old = jnp.broadcast_to(old, (b, t, s))
            mask = (new_valid[:, None, :] & causal, old)
        cos, sin = rotary_cos_sin(positions, self.rotary_dims, self.rotary_base)
        x = _hook(self, "hook_embed", self.embed_in(input_ids))  # [B, T, D]
        if isinstance(self.layers, nnx.List):  # unrolled: one buffer per layer
            ks, vs = [], []
            last = len(self.layers) - 1
            for i, block in enumerate(self.layers):
                kv = None if cache is None else (cache["k"][i], cache["v"][i])
                r = rows if i == last else None
                if cache is None and self.remat != "none":  # the block's weights are closed over (traced inputs)
                    x = remat_block(
                        lambda x, cos, sin, mask, b=block, r=r: b(x, cos, sin, mask, None, 0, r)[0], self.remat
                    )(x, cos, sin, mask)
                    continue
                x, kv = block(x, cos, sin, mask, kv, cache_index, r)
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            if cache is not None:
                cache = {"k": ks, "v": vs}
        else:  # stacked [L, ...] under lax.scan
            extras = _take_extras(self.layers)  # kernel_t / LoRA arrays [L, ...]: scanned over with the weights
            graphdef, state = nnx.split(self.layers)

            def body(x, layer):
                layer_state, kv, layer_extras, i = layer
                block = nnx.merge(graphdef, layer_state)
                _put_extras(block, extras, layer_extras, i)
                x, kv = block(x, cos, sin, mask, kv, cache_index)
                return x, kv

            kvs = None if cache is None else (cache["k"], cache["v"])
            if cache is None:  # under scan, CSE across iterations is impossible anyway (jax.checkpoint's docs)
                body = remat_block(body, self.remat, prevent_cse=False)
            layer_extras = [(kt, lo and (lo.a, lo.b)) for _, kt, lo in extras]
            n = jax.tree.leaves(state)[0].shape[0]
            x, kvs = jax.lax.scan(body, x, (state, kvs, layer_extras, jnp.arange(n)))
            _put_extras(self.layers, extras)
            if cache is not None:
                cache = {"k": kvs[0], "v": kvs[1]}
            if rows is not None:  # every layer ran in full: pick the rows after
                x = jnp.take_along_axis(x, rows[..., None], axis=1)
        return self.final_layer_norm(x), cache

    def logits(self, hidden):  # [B, T, D] -> [B, T, V] float32
        return _hook(self, "unembed.hook_out", self.embed_out(_hook(self, "unembed.hook_in", hidden), out_dtype=F32))

    def __call__(self, input_ids, positions, kv_valid, cache=None, cache_index=0):
        hidden, cache = self.hidden_states(input_ids, positions, kv_valid, cache, cache_index)
        return self.logits(hidden), cache


# ---- functional core ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def graphdef(cfg: NeoXConfig, stacked: bool = False, quant: int8.QuantSpec | None = None):
    """The module structure (no arrays) for `nnx.merge(graphdef(cfg), params)`; quant: int8 Linears (int8.py)."""
    abstract = nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(0), stacked=stacked))
    abstract = abstract if quant is None else quantize_module(abstract, quant)
    return nnx.split(abstract)[0]


def abstract_params(cfg: NeoXConfig, dtype=F32, stacked: bool = False, quant=None) -> Params:
    """Shapes and dtypes of every parameter, nothing allocated (jax.eval_shape)."""
    abstract = nnx.eval_shape(lambda: GPTNeoX(cfg, param_dtype=dtype, rngs=nnx.Rngs(0), stacked=stacked))
    abstract = abstract if quant is None else quantize_module(abstract, quant)
    return nnx.to_pure_dict(nnx.state(abstract))


def logical_axes(cfg: NeoXConfig, stacked: bool = False, quant=None) -> Params:
    """The same tree as the params, each leaf a tuple of logical axis names ("layers" first when stacked)."""
    abstract = nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(0), stacked=stacked))
    abstract = abstract if quant is None else quantize_module(abstract, quant)
    state = nnx.state(abstract)

    def axes(path, var):
        names = tuple(var.get_metadata()["axes"])
        return ("layers",) + names if stacked and path[0] == "layers" else names

    return nnx.to_pure_dict(
        jax.tree_util.tree_map_with_path(
            lambda p, v: axes([getattr(k, "key", k) for k in p], v),
            state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    )


def init_params(cfg: NeoXConfig, dtype=F32, seed: int = 0, stacked: bool = False) -> Params:
    """Random parameters (normal, std 0.02) as a plain nested dict; for demos and benchmarks."""
    model = GPTNeoX(cfg, param_dtype=dtype, rngs=nnx.Rngs(seed), stacked=stacked)
    return nnx.to_pure_dict(nnx.state(model))


def is_stacked(params: Params) -> bool:
    return 0 not in params["layers"]


def stack_layers(params: Params) -> Params:
    """{0: layer, 1: layer, ...} -> one [L, ...] buffer per weight (runs under lax.scan)."""
    layers = [params["layers"][i] for i in range(len(params["layers"]))]
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: Params) -> Params:
    """[L, ...] buffers -> {0: layer, 1: layer, ...} (unrolled)."""
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return {**params, "layers": {i: jax.tree.map(lambda x: x[i], params["layers"]) for i in range(n)}}


def model_from_params(
    cfg: NeoXConfig,
    params: Params,
    transposed: bool = False,
    attention: str | None = None,
    lora=None,
    lora_key=None,
    remat: str = "none",
) -> GPTNeoX:
    """The module tree over `params`; transposed=True for params from `decode.transpose_kernels`. A Linear's
    "kernel_t" entry (from `finetune.prepare_frozen`) becomes its `kernel_t`, not a parameter; its "lora_A" /
    "lora_B" entries (unmerged LoRA adapters) its `lora`, with lora (a lora.LoraSpec) giving the scale and dropout
    and lora_key (None: no dropout) the dropout's PRNG key, folded with each Linear's index. attention: the
    attention without cache slots (None: per backend; "plain", "xla", "cudnn": see neox_jax/model/attention.py);
    remat: the activation checkpointing of each block in a forward without a cache (REMAT)."""
    params, extras = _pop_extras(params)
    model = nnx.merge(graphdef(cfg, is_stacked(params), int8.spec_of(params)), params)
    if remat != "none":
        remat_block(None, remat)  # a clear error for an unknown policy
        model.remat = remat
    if attention is not None:
        for _, module in nnx.iter_modules(model):
            if isinstance(module, Attention):
                module.implementation = attention
    if transposed or extras:
        linears = [(tuple(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear)]
        for i, (path, module) in enumerate(linears):
            extra = extras.get(path, {})
            module.transposed = transposed
            module.kernel_t = extra.get("kernel_t")
            if "lora_A" in extra:
                if lora is None:
                    raise ValueError(
                        "params hold LoRA adapters: pass lora=LoraSpec, or fold them in with lora.merge_adapters"
                    )
                key = None if lora_key is None else jax.random.fold_in(lora_key, i)
                module.lora = LoraAdapter(extra["lora_A"], extra["lora_B"], lora, key)
    return model


EXTRAS = ("kernel_t", "lora_A", "lora_B")  # Linear entries that are inputs of the step, not nnx parameters


def _pop_extras(params: Params, path: tuple = ()) -> tuple[Params, dict]:
    """params without their EXTRAS entries, and {path of the Linear: {name: array}}."""
    out, found = {}, {}
    for k, v in params.items():
        if k in EXTRAS:
            found.setdefault(path, {})[k] = v
        elif isinstance(v, dict):
            out[k], sub = _pop_extras(v, path + (k,))
            found.update(sub)
        else:
            out[k] = v
    return out, found


def forward(
    cfg: NeoXConfig,
    params: Params,
    input_ids,
    positions=None,
    kv_valid=None,
    cache=None,
    cache_index=0,
    attention: str | None = None,
    lora=None,
    lora_key=None,
    remat: str = "none",
):
    """Pure function: logits [B, T, V] float32 and the updated cache. Without positions / kv_valid every token is real
    and positions count from 0. attention, lora, lora_key, remat: see model_from_params (lora: params with unmerged
    LoRA adapters)."""
    b, t = input_ids.shape
    if kv_valid is None:
        kv_valid = jnp.ones((b, t), bool)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return model_from_params(cfg, params, attention=attention, lora=lora, lora_key=lora_key, remat=remat)(
        input_ids, positions, kv_valid, cache, cache_index
    )


def positions_from_mask(mask):
    """mask [B, T] (1 = real token, left padding allowed) -> positions [B, T] counted over real tokens only."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


# ---- int8 Linears (the kernels: int8.py) ----------------------------------------------------------------------------


def int8_targets(spec: int8.QuantSpec) -> tuple[str, ...]:
    """The Linears that are int8 under spec: the block linears, and embed_out when spec.embed_out."""
    return BLOCK_LINEARS + (("embed_out",) if spec.embed_out else ())


def quantize_module(module, spec: int8.QuantSpec):
    """Turns the target Linears of an abstract (nnx.eval_shape) GPTNeoX into their int8 form, in place: int8 kernel
    with the kernel's logical axes, float32 scale with the kernel's output axes, and for llm.int8 a scalar
    threshold (axes ()). Returns the module."""
    targets = int8_targets(spec)
    for path, m in list(nnx.iter_modules(module)):
        if not isinstance(m, Linear) or path[-1] not in targets:
            continue
        axes = tuple(m.kernel.get_metadata()["axes"])
        _, contracted, _ = int8.parse_spec(m.spec)
        q, scale = jax.eval_shape(functools.partial(int8.quantize_weight, spec=m.spec), m.kernel.get_value())
        lead = int8.lead_axes(q.ndim, m.spec)
        m.kernel = nnx.data(nnx.Param(q, axes=axes))
        m.scale = nnx.data(nnx.Param(scale, axes=axes[len(contracted) :]))
        if spec.mode == "llm.int8":
            m.threshold = nnx.data(nnx.Param(jax.ShapeDtypeStruct(q.shape[:lead], F32), axes=()))
    return module
