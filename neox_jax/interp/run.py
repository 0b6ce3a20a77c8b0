"""run_with_cache / run_with_hooks: a GPT-NeoX forward with TransformerLens hook points, inside one compiled program.

Hook names (i the layer; shapes B batch, T positions, N heads, H head dim, D hidden, F mlp):

    hook_embed                                   [B, T, D]
    blocks.{i}.hook_resid_pre                    [B, T, D]   the block's input (= transformers hidden_states[i])
    blocks.{i}.ln1.hook_scale                    [B, T, 1]   input_layernorm's sqrt(var + eps) (TransformerLens)
    blocks.{i}.ln1.hook_normalized               [B, T, D]   (x - mean) / scale: before the weight and bias, as TL
    blocks.{i}.attn.hook_q / hook_k / hook_v     [B, T, N, H]  before rotary
    blocks.{i}.attn.hook_rot_q / hook_rot_k      [B, T, N, H]  after rotary
    blocks.{i}.attn.hook_attn_scores             [B, N, T, T]  q.k / sqrt(H), masked entries float32 min (TL: -inf)
    blocks.{i}.attn.hook_pattern                 [B, N, T, T]  softmax of the scores (= transformers attentions[i])
    blocks.{i}.attn.hook_z                       [B, T, N, H]  pattern @ v: the input of attention.dense, per head
    blocks.{i}.hook_attn_out                     [B, T, D]   attention.dense's output, its bias included
    blocks.{i}.hook_resid_mid                    [B, T, D]   resid_pre + attn_out (sequential residual only)
    blocks.{i}.ln2.hook_scale / hook_normalized  [B, T, 1] / [B, T, D]   post_attention_layernorm's, as ln1
    blocks.{i}.mlp.hook_pre / hook_post          [B, T, F]   before / after the activation
    blocks.{i}.hook_mlp_out                      [B, T, D]
    blocks.{i}.hook_resid_post                   [B, T, D]
    ln_final.hook_scale / hook_normalized        [B, T, 1] / [B, T, D]   final_layer_norm's, as ln1
    unembed.hook_in                              [B, T, D]   final_layer_norm's output (weight and bias applied)
    unembed.hook_out                             [B, T, V]   the logits

The hook points are one-line `_hook(self, name, x)` calls in neox_jax/model/neox.py, no-ops unless this module sets the
modules' `hook` attribute while tracing; the default forward compiles exactly as before. With hooks on a layer's
attention, its scores and pattern are computed explicitly (the fused / blocked paths never materialise them).

Compiles: one program per (selected names, hook structure, shapes, param dtypes). Hook functions are split into a
static part and the arrays they close over (neox_jax/model/hooks.py), so a new function of the same code with new array
values (a patch taken from another run's cache) reuses the program; a new Python scalar in a closure compiles again.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.errors import NeoXError
from neox_jax.model import hooks as hookfns
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import GPTNeoX, is_stacked, model_from_params, positions_from_mask, unstack_layers
from neox_jax.parallel import sharding

F32 = jnp.float32
GLOBAL_NAMES = ("hook_embed", "unembed.hook_in", "unembed.hook_out")
LN_NAMES = ("hook_scale", "hook_normalized")  # TransformerLens's LayerNorm hooks, in forward order
ATTN_NAMES = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern", "hook_z")
MLP_NAMES = ("hook_pre", "hook_post")


def _block_names(cfg: NeoXConfig) -> tuple[str, ...]:
    """The names the Block module itself owns (its layernorms, attention and mlp own theirs)."""
    mid = () if cfg.use_parallel_residual else ("hook_resid_mid",)
    return ("hook_resid_pre", "hook_attn_out", *mid, "hook_mlp_out", "hook_resid_post")


def hook_names(cfg: NeoXConfig) -> list[str]:
    """Every hook name of this model, in forward order."""
    mid = () if cfg.use_parallel_residual else ("hook_resid_mid",)
    layer = [
        "hook_resid_pre",
        *(f"ln1.{n}" for n in LN_NAMES),
        *(f"attn.{n}" for n in ATTN_NAMES),
        "hook_attn_out",
        *mid,
        *(f"ln2.{n}" for n in LN_NAMES),
        *(f"mlp.{n}" for n in MLP_NAMES),
        "hook_mlp_out",
        "hook_resid_post",
    ]  # forward order
    return [
        "hook_embed",
        *(f"blocks.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in layer),
        *(f"ln_final.{n}" for n in LN_NAMES),
        "unembed.hook_in",
        "unembed.hook_out",
    ]


def _unknown(name, valid: list[str]) -> NeoXError:
    close = difflib.get_close_matches(str(name), valid, n=5, cutoff=0.6)
    hint = f"; close valid names: {', '.join(close)}" if close else f"; valid names look like {valid[0]}, {valid[-1]}"
    return NeoXError(f"unknown hook name {name!r}{hint}")


def select_names(cfg: NeoXConfig, names_filter) -> tuple[str, ...]:
    """names_filter: None (every name), a name, a list of names, a regex (str or re.Pattern, matched in full against
    each name) or a predicate name -> bool. Returns the selected names in forward order; NeoXError when a listed name
    is unknown or a regex / predicate selects none."""
    valid = hook_names(cfg)
    if names_filter is None:
        return tuple(valid)
    if isinstance(names_filter, (str, re.Pattern)):
        if isinstance(names_filter, str) and names_filter in valid:
            return (names_filter,)
        pattern = re.compile(names_filter)
        chosen = tuple(n for n in valid if pattern.fullmatch(n))
    elif callable(names_filter):
        chosen = tuple(n for n in valid if names_filter(n))
    else:
        listed = list(names_filter)
        for n in listed:
            if n not in valid:
                raise _unknown(n, valid)
        return tuple(n for n in valid if n in set(listed))
    if not chosen:
        raise _unknown(getattr(names_filter, "pattern", names_filter), valid)
    return chosen


class HookPoint:
    """Passed as `hook=` to a hook function that has a `hook` parameter (TransformerLens's signature)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"HookPoint({self.name!r})"


class _Recorder:
    """Trace-time state of one forward: applies the hook functions (on float32 copies) and records activations."""

    def __init__(self, names: frozenset, hooks: dict[str, list[Callable]]):
        self.names, self.hooks, self.cache = names, hooks, {}

    def __call__(self, name: str, x):
        fns = self.hooks.get(name, ())
        if fns:
            y = x.astype(F32)
            for fn in fns:
                out = fn(y, hook=HookPoint(name)) if _takes_hook(fn) else fn(y)
                if getattr(out, "shape", None) != y.shape or getattr(out, "dtype", None) != F32:
                    got = f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}"
                    raise NeoXError(f"hook on {name!r} returned {got}; expected float32 {y.shape} (its input's)")
                y = out
            x = y.astype(x.dtype)
        if name in self.names:
            self.cache[name] = x.astype(F32)
        return x

    def attend(self, prefix: str, q, k, v, new_mask, old_mask, rows):
        """q, k, v [B, N, T, H], new_mask [B, T, T] -> z [B, N, T, H] float32, as model._attend computes it, with the
        scores and pattern materialised for their hooks."""
        if old_mask is not None or rows is not None:
            raise NeoXError("hooks run on a forward pass without a KV cache or scored rows")
        scores = jnp.einsum("BNTH,BNUH->BNTU", q, k, preferred_element_type=F32) * q.shape[-1] ** -0.5
        scores = self(prefix + "hook_attn_scores", jnp.where(new_mask[:, None], scores, jnp.finfo(F32).min))
        pattern = self(prefix + "hook_pattern", jax.nn.softmax(scores, axis=-1))  # [B, N, T, T] float32
        return jnp.einsum("BNTU,BNUH->BNTH", pattern.astype(v.dtype), v, preferred_element_type=F32)


def _takes_hook(fn) -> bool:
    try:
        return "hook" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


class _Point:
    """A module's `hook`: its name prefix over the forward's _Recorder."""

    def __init__(self, recorder: _Recorder, prefix: str):
        self.recorder, self.prefix = recorder, prefix

    def __call__(self, name: str, x):
        return self.recorder(self.prefix + name, x)

    def attend(self, *args):
        return self.recorder.attend(self.prefix, *args)


def _install(cfg: NeoXConfig, model: GPTNeoX, recorder: _Recorder, active: set[str]) -> None:
    """Sets `hook` on the modules that own an active name (attention only there: its explicit path is slower)."""

    def put(module, prefix, own):
        if any(prefix + n in active for n in own):
            module.hook = _Point(recorder, prefix)

    put(model, "", GLOBAL_NAMES)
    put(model.final_layer_norm, "ln_final.", LN_NAMES)
    for i, block in enumerate(model.layers):
        put(block, f"blocks.{i}.", _block_names(cfg))
        put(block.input_layernorm, f"blocks.{i}.ln1.", LN_NAMES)
        put(block.post_attention_layernorm, f"blocks.{i}.ln2.", LN_NAMES)
        put(block.attention, f"blocks.{i}.attn.", ATTN_NAMES)
        put(block.mlp, f"blocks.{i}.mlp.", MLP_NAMES)


@functools.partial(jax.jit, static_argnames=("cfg", "names", "hook_specs"))
def _forward(params, ids, mask, hook_arrays, *, cfg: NeoXConfig, names: tuple, hook_specs: tuple):
    """-> logits [B, T, V] float32, {name: float32 activation} for `names`."""
    hooks: dict[str, list] = {}
    for (name, spec), arrays in zip(hook_specs, hook_arrays):
        hooks.setdefault(name, []).append(hookfns.join(spec, arrays))
    params = unstack_layers(params) if is_stacked(params) else params  # hooks need one module per layer
    model = model_from_params(cfg, params)
    recorder = _Recorder(frozenset(names), hooks)
    _install(cfg, model, recorder, set(names) | set(hooks))
    hidden, _ = model.hidden_states(ids, positions_from_mask(mask), mask.astype(bool))
    return model.logits(hidden), recorder.cache


class ActivationCache(dict):
    """{hook name: float32 jax array}, in forward order; a missing name raises NeoXError listing close names."""

    def __missing__(self, name):
        close = difflib.get_close_matches(str(name), list(self), n=5, cutoff=0.6)
        raise NeoXError(
            f"{name!r} is not in this cache (it holds what names_filter selected: {len(self)} names)"
            + (f"; close names in it: {', '.join(close)}" if close else "")
        )


jax.tree_util.register_pytree_node(  # a pytree like dict, so a hook closing over a cache traces its arrays
    ActivationCache, lambda c: (list(c.values()), list(c.keys())), lambda keys, vals: ActivationCache(zip(keys, vals))
)


def _inputs(model, ids, mask):
    cfg = model.config
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise NeoXError(f"ids must be an int array [batch, length], got {ids.dtype} shape {ids.shape}")
    if ids.shape[1] > cfg.max_position_embeddings:
        raise NeoXError(f"length {ids.shape[1]} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise NeoXError(f"token ids must be in [0, {cfg.vocab_size}), got {ids.min()}..{ids.max()}")
    mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask, np.int32).reshape(-1, ids.shape[1])
    if mask.shape != ids.shape:
        raise NeoXError(f"mask shape {mask.shape} differs from ids shape {ids.shape}")
    if model.mesh is None:
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)
    sharding.check_divisible(cfg, model.mesh, batch=ids.shape[0])
    return sharding.put_batch(ids.astype(np.int32), model.mesh), sharding.put_batch(mask, model.mesh)


def _hooks(cfg: NeoXConfig, fwd_hooks: Iterable) -> tuple[tuple, list]:
    """[(name or filter, fn), ...] -> static ((name, spec), ...) and the hooks' arrays, one list per hook."""
    specs, arrays = [], []
    for pair in fwd_hooks:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and callable(pair[1])):
            raise NeoXError(f"fwd_hooks entries are (name, fn) pairs; got {pair!r}")
        spec, arrs = hookfns.split(pair[1])
        for name in select_names(cfg, pair[0]):  # a name, or a regex / predicate: every name it selects
            specs.append((name, spec))
            arrays.append(arrs)
    return tuple(specs), arrays


def run_with_cache(model, ids, names_filter=None, mask=None, fwd_hooks=()):
    """model: a neox_jax.NeoX; ids [B, T] (or [T]) int; mask [B, T] 1 for real tokens (left padding allowed).
    Returns (logits [B, T, V] float32, ActivationCache of the selected names, float32 [B, ...]), as jax arrays (on
    the model's mesh when it has one). With fwd_hooks (see run_with_hooks) the cache holds the hooked values."""
    names = select_names(model.config, names_filter)
    specs, arrays = _hooks(model.config, fwd_hooks)
    ids, mask = _inputs(model, ids, mask)
    logits, cache = _forward(model.params, ids, mask, arrays, cfg=model.config, names=names, hook_specs=specs)
    return logits, ActivationCache((n, cache[n]) for n in names)


def run_with_hooks(model, ids, fwd_hooks, mask=None):
    """fwd_hooks: [(name, fn), ...], fn(activation float32) -> float32 activation of the same shape, run inside the
    compiled forward, in list order (TransformerLens's fn(activation, hook) also works: hook.name is the name). The
    name may also be a regex or predicate (one hook per matching name). Returns logits [B, T, V] float32."""
    return run_with_cache(model, ids, names_filter=(), mask=mask, fwd_hooks=fwd_hooks)[0]
