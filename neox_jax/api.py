"""`neox_jax.load(path)`: the user-facing model object."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.inference.generate import GenerateResult, Generator, Stream
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import Params, forward, positions_from_mask
from neox_jax.parallel import sharding
from neox_jax.store import checkpoint
from neox_jax.store.tokenizer import Tokenizer


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg: NeoXConfig, params: Params, ids, mask):
    return forward(cfg, params, ids, positions_from_mask(mask), mask.astype(bool))[0]


class NeoX:
    """A loaded GPT-NeoX: config, params (a plain nested dict of jax arrays) and the tokenizer (or None).
    mesh: the jax.sharding.Mesh the params are sharded over (None: one device)."""

    def __init__(
        self, config: NeoXConfig, params: Params, tokenizer: Tokenizer | None = None, path: str | None = None, mesh=None
    ):
        self.config, self.params, self.tokenizer, self.path, self.mesh = config, params, tokenizer, path, mesh

    @property
    def dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    def logits(self, ids, mask=None) -> np.ndarray:
        """ids: int array [B, T] (or a list of lists of equal length); mask [B, T], 1 for real tokens (left padding
        allowed). Returns float32 numpy logits [B, T, vocab_size]. On a mesh the batch is split over `data` (B must be
        a multiple of its size); on several processes every process passes the same ids and gets all the logits."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be an int array [batch, length], got {ids.dtype} shape {ids.shape}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {ids.shape[1]} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}")
        mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask, np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"mask shape {mask.shape} differs from ids shape {ids.shape}")
        if self.mesh is None:
            return np.asarray(_logits(self.config, self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
        sharding.check_divisible(self.config, self.mesh, batch=ids.shape[0])
        ids, mask = sharding.put_batch(ids.astype(np.int32), self.mesh), sharding.put_batch(mask, self.mesh)
        return sharding.to_host(_logits(self.config, self.params, ids, mask))

    def generator(self) -> Generator:
        """The Generator (compiled programs kept between calls) over the current params."""
        if getattr(self, "_generator", None) is None:
            self._generator = Generator(self.config, self.params, self.tokenizer, mesh=self.mesh)
        self._generator.params, self._generator.tokenizer = self.params, self.tokenizer
        return self._generator

    def generate(
        self,
        prompts,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k=None,
        top_p=None,
        seed: int = 0,
        stop=None,
        draft: NeoX | None = None,
        draft_tokens: int = 4,
        **kwargs,
    ) -> GenerateResult:
        """prompts: a string, a list of strings, or token-id lists. Greedy at temperature 0; `stop` strings and
        `stop_token_ids` (default end-of-text) end a completion; also repetition_penalty, callback(StreamEvent).
        draft: a smaller model with the same tokenizer proposing draft_tokens tokens a step (speculative decoding,
        docs/generation.md: the target's output distribution, greedy its very tokens; `.speculative` holds the
        acceptance statistics). Returns token_ids, texts, finish_reasons, timing (see neox_jax.inference.generate)."""
        gen = self.generator() if draft is None else self._speculative_generator(draft, draft_tokens)
        return gen.generate(prompts, max_new_tokens, temperature, top_k, top_p, seed=seed, stop=stop, **kwargs)

    def _speculative_generator(self, draft: NeoX, draft_tokens: int):
        from neox_jax.inference.speculative_driver import for_models

        return for_models(self, draft, draft_tokens)

    def generate_stream(
        self,
        prompts,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k=None,
        top_p=None,
        seed: int = 0,
        stop=None,
        chunk_size: int = 1,
        draft: NeoX | None = None,
        draft_tokens: int = 4,
        **kwargs,
    ) -> Stream:
        """As generate, as an iterator of StreamEvents (new ids and text per prompt), one per token (chunk_size: decode
        steps per event; more is faster on CPU, where each event is a call into the compiled loop); `.result` at the
        end. draft, draft_tokens: as generate (chunk_size then counts draft rounds)."""
        gen = self.generator() if draft is None else self._speculative_generator(draft, draft_tokens)
        return gen.stream(
            prompts, max_new_tokens, temperature, top_k, top_p, seed=seed, stop=stop, chunk_size=chunk_size, **kwargs
        )

    def run_with_cache(self, ids, names_filter=None, mask=None, fwd_hooks=()):
        """(logits, cache {TransformerLens hook name: float32 activation}) of one compiled forward; names_filter: a
        list of names, a regex or a predicate (default: every name). See neox_jax/interp/run.py and
        docs/interpretability.md."""
        from neox_jax.interp import run as interp

        return interp.run_with_cache(self, ids, names_filter, mask, fwd_hooks)

    def run_with_hooks(self, ids, fwd_hooks, mask=None):
        """logits [B, T, V] float32 of a forward with fwd_hooks [(name, fn), ...] applied inside it (ablation,
        patching, steering): fn(float32 activation) -> float32 activation of the same shape."""
        from neox_jax.interp import run as interp

        return interp.run_with_hooks(self, ids, fwd_hooks, mask)

    def __repr__(self):
        c = self.config
        mesh = "" if self.mesh is None else f", mesh {dict(self.mesh.shape)}"
        return (
            f"NeoX({c.num_params / 1e6:.1f}M params, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
            f"dtype {jnp.dtype(self.dtype).name}, tokenizer={'yes' if self.tokenizer else 'no'}{mesh})"
        )


def _restore(ckpt: checkpoint.Stored, dtype, mesh) -> Params:
    """Reads the params one group at a time; with a mesh, straight into arrays sharded by sharding.RULES: each device
    reads only its slice from the checkpoint (Orbax), so the host never holds the whole model."""
    if mesh is None:
        return checkpoint.restore_params(ckpt, dtype)
    shardings = sharding.param_shardings(ckpt.cfg, mesh, quant=ckpt.quant)  # fails here, before reading
    return checkpoint.restore_params(ckpt, dtype, lambda name: checkpoint.get_group(shardings, name))


def _apply_finetuned(params: Params, cfg: NeoXConfig, run_dir) -> Params:
    """Replaces the trainable parameters with those of a fine-tuning run (RUN_DIR/finetuned, see
    neox_jax.training.step)."""
    from neox_jax.training.step import apply_finetuned

    return apply_finetuned(params, cfg, run_dir)


def _quantize(params: Params, cfg: NeoXConfig, mode: str) -> Params:
    """int8 / llm.int8 weights (neox_jax/model/quantize.py), one group at a time so each float group is freed as it is
    replaced. An int8 checkpoint (already quantized) just switches mode."""
    from neox_jax.model import quantize

    if mode not in quantize.MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {quantize.MODES}")
    current = quantize.spec_of(params)
    if current is not None and current.mode == mode:
        return params  # an int8 checkpoint in this mode: keep its stored threshold
    embed_out = (current or quantize.QuantSpec(mode)).embed_out
    for name in checkpoint.group_names(cfg):
        checkpoint.set_group(
            params,
            name,
            quantize.quantize_tree({name: checkpoint.get_group(params, name)}, mode, embed_out=embed_out)[name],
        )
    return params


def load(
    path: str | os.PathLike,
    dtype=None,
    *,
    revision: str | None = None,
    mesh=None,
    finetuned=None,
    adapter=None,
    quantize=None,
    tokenizer=None,
    verify=False,
) -> NeoX:
    """Loads a neox-jax checkpoint directory (made by `neox-jax convert ...`), or a hub id `org/name`.

    A hub id (with `revision`: a branch, tag or commit, e.g. "step143000" for Pythia; default "main") is downloaded
    and verified (neox_jax.store.hub), converted once into $NEOX_JAX_CACHE (default ~/.cache/neox-jax) keyed by commit
    and
    dtype (default float32), and loaded from there afterwards. Conversion needs the `convert` extra (torch only for
    pytorch_model.bin files).

    dtype: float32 / float16 / bfloat16 (or fp32 / fp16 / bf16) to cast the parameters to (default: as stored).
    mesh: a jax.sharding.Mesh, or a string such as "data=2,model=4" or "model=-1" (see
    neox_jax.parallel.sharding.make_mesh),
    to restore the params onto, sharded.
    finetuned: a fine-tuning run directory whose trained parameters replace the checkpoint's (a LoRA run's adapters
    are folded into the weights).
    adapter: a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), folded into the weights
    as W + scale * A @ B in float32, then cast to the weights' dtype (see neox_jax/store/peft.py).
    quantize: None, "int8" (weight-only) or "llm.int8" (see neox_jax/model/quantize.py). An int8 checkpoint (made by
    `neox-jax convert quantize`) loads quantized without it; passing the other mode switches modes.
    tokenizer: a tokenizer.json to use instead of the checkpoint's own.
    verify: re-hash every stored file against the checksums in metadata.json first (reads the whole checkpoint
    once more; without it, load checks groups, layer count, file sizes, shapes and dtypes, which is cheap)."""
    path = _local_path(path, revision, dtype)
    dtype = None if dtype is None else checkpoint.dtype_name(dtype)
    mesh = sharding.make_mesh(mesh) if isinstance(mesh, str) else mesh
    ckpt = checkpoint.open(path)  # metadata.json read and checked once
    if verify:
        checkpoint.verify(ckpt)
    params = _restore(ckpt, dtype, mesh)
    if finetuned is not None:
        params = _apply_finetuned(params, ckpt.cfg, finetuned)
    if adapter is not None:
        params = _apply_adapter(params, ckpt.cfg, adapter)
    if quantize is not None:
        params = _quantize(params, ckpt.cfg, quantize)
    tok = _tokenizer(ckpt.path, tokenizer)
    return NeoX(ckpt.cfg, params, tok, str(path), mesh=mesh)


def _local_path(path, revision: str | None, dtype) -> Path:
    """A local checkpoint directory; a hub id is converted once into the neox-jax cache (convert/hub.py)."""
    from neox_jax.store import converters, hub

    if not hub.is_hub_id(path):
        if revision is not None:
            raise checkpoint.CheckpointError(f"revision={revision!r}: {path} is a local checkpoint, not a hub id")
        return Path(path)
    try:
        return converters.module("hub").cached_checkpoint(
            str(path), revision, checkpoint.dtype_name(dtype or "float32")
        )
    except hub.UnknownRepoError as e:  # maybe a mistyped local path
        raise hub.UnknownRepoError(f"{path}: no such checkpoint directory, and {e}") from None


def _apply_adapter(params: Params, cfg: NeoXConfig, adapter) -> Params:
    from neox_jax.model import lora
    from neox_jax.store import peft

    spec, adapters = peft.read_adapter(adapter, cfg)
    return lora.merge_adapters(params, adapters, spec.scale)


def _tokenizer(ckpt_dir: Path, tokenizer) -> Tokenizer | None:
    """The given tokenizer.json, else the checkpoint's own, else None (ids in, ids out)."""
    tok_file = Path(tokenizer) if tokenizer is not None else ckpt_dir / "tokenizer.json"
    if tokenizer is not None and not tok_file.is_file():
        raise checkpoint.CheckpointError(f"tokenizer {tok_file}: no such file")
    return Tokenizer.from_file(tok_file) if tok_file.is_file() else None
