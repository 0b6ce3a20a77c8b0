"""Fine-tuning core: which parameters train, the optimizer, dynamic loss scaling and the one jitted, sharded train step.

Trainable subsets (`--trainable`):
  biases  BitFit as the GPT-NeoX-20B reference did it: in every layer the biases of attention.query_key_value,
          attention.dense and mlp.dense_h_to_4h. mlp.dense_4h_to_h's bias is left out because under the parallel
          residual (20B, Pythia) it is redundant: a block computes x + (attn(ln1(x)) + b_dense) + (mlp(ln2(x)) + b_4h),
          both biases add one constant vector to the same residual sum, so only b_dense + b_4h matters and the two
          receive identical gradients; training attention.dense's bias already moves that sum. (With the sequential
          residual b_dense also feeds post_attention_layernorm, so there they differ; we keep the reference's set.)
  all     every parameter.
  lora    a lora.LoraSpec instead of a name: new float32 adapters on the block linears (neox_jax/model/lora.py); every
  base
          parameter frozen.

Precision: the frozen weights stay in the run's dtype; the trainable ones keep float32 master copies, are cast to the
run's dtype for the forward pass (LoRA adapters are not: their products run in float32), and get float32 gradients
and optimizer state. Only the trainable subset has gradients or optimizer state at all (it is what `jax.grad`
differentiates; the frozen tree is a plain input). The loss is next-token cross entropy on float32 logits.

Dynamic loss scaling (float16 only; a fixed scale of 1 otherwise), the scheme of jmp.DynamicLossScale and
torch.cuda.amp.GradScaler in a few lines (jmp is unmaintained since 2023; optax has no loss scaler): the loss is
multiplied by `scale` before differentiation and the gradients divided by it after; if any gradient is not finite
(the step sees it as a non-finite global gradient norm) the update is skipped (params and optimizer state kept) and
the scale halved (never below 1); after `period` finite steps in a row it doubles.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from neox_jax.model import lora
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import LINEARS, abstract_params, forward, kernel_in_dims, transpose_kernel
from neox_jax.parallel.sharding import batch_sharding, param_shardings
from neox_jax.store import checkpoint, checksums
from neox_jax.training import stacking

F32 = jnp.float32
MODES = ("biases", "all")
BITFIT_LINEARS = ("query_key_value", "dense", "dense_h_to_4h")  # whose biases BitFit trains (the module docstring)
BIAS_PATHS = tuple((LINEARS[name].parent, name, "bias") for name in BITFIT_LINEARS)
FINETUNED = "finetuned"  # RUN_DIR/finetuned: the trained parameters, a small Orbax checkpoint + metadata.json
FORMAT = "neox-jax-finetuned"


# ---- trainable subsets -----------------------------------------------------------------------------------------------


def is_trainable(path: tuple, mode: str) -> bool:
    """path: keys from the params root, e.g. ("layers", 3, "attention", "dense", "bias")."""
    if mode == "all":
        return True
    if lora.is_lora(mode):  # the adapters are new parameters; the whole base is frozen
        return False
    if mode == "biases":
        return path[0] == "layers" and tuple(path[-3:]) in BIAS_PATHS
    raise ValueError(f"unknown trainable subset {mode!r}; expected one of {MODES}")


def split_params(params: dict, mode: str, prefix: tuple = ()) -> tuple[dict, dict]:
    """Nested dict -> (trainable, frozen): two nested dicts holding disjoint leaves (empty branches dropped)."""
    trainable, frozen = {}, {}
    for k, v in params.items():
        if isinstance(v, dict):
            t, f = split_params(v, mode, prefix + (k,))
            if t:
                trainable[k] = t
            if f:
                frozen[k] = f
        elif is_trainable(prefix + (k,), mode):
            trainable[k] = v
        else:
            frozen[k] = v
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    """Inverse of split_params."""
    out = dict(frozen)
    for k, v in trainable.items():
        out[k] = merge_params(v, out[k]) if isinstance(v, dict) and k in out else v
    return out


def cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def abstract_trainable(cfg: NeoXConfig, mode: str, stacked: bool = False) -> dict:
    """The float32 master copies' shapes (nothing allocated); stacked: the layout of training/stacking.py."""
    if lora.is_lora(mode):
        tree = lora.abstract_adapters(cfg, mode)
    else:
        tree = split_params(abstract_params(cfg, F32), mode)[0]
    return stacking.stack_abstract(tree) if stacked else tree


def trainable_shardings(cfg: NeoXConfig, mesh, mode, stacked: bool = False) -> dict:
    """The masters' shardings: the parameter rules (LoRA: each adapter like the matrix it adapts)."""
    if lora.is_lora(mode):
        tree = lora.adapter_shardings(cfg, mode, mesh)
    else:
        tree = split_params(param_shardings(cfg, mesh), mode)[0]
    return stacking.stack_shardings(tree) if stacked else tree


def wants_backward_kernels(dtype, mesh, transposed_copies: bool = True) -> bool:
    """bfloat16 training on CPU keeps a transposed copy of each frozen kernel for the backward pass: XLA CPU
    multiplies bfloat16 at full speed only in the untransposed orientation (model.matmul_f32). It costs one more
    copy of the frozen weights; transposed_copies=False turns it off (slower steps: docs/performance.md).
    Not for float16: XLA CPU converts float16 products to float32 in every orientation."""
    return transposed_copies and jnp.dtype(dtype) == jnp.bfloat16 and mesh.devices.flat[0].platform == "cpu"


def _add_kernels_t(tree: dict, value, name=None) -> dict:
    """tree with a "kernel_t" entry beside every Linear's "kernel": value(Linear name, kernel)."""
    out = {k: _add_kernels_t(v, value, k) if isinstance(v, dict) else v for k, v in tree.items()}
    if "kernel" in tree:
        out["kernel_t"] = value(name, tree["kernel"])
    return out


def frozen_shardings(
    cfg: NeoXConfig, mesh, mode: str, dtype=None, transposed_copies: bool = True, stacked: bool = False
) -> dict:
    """Shardings of the frozen params, with their kernel_t copies when wants_backward_kernels(...): an [O, I] copy
    is split like its kernel's leading output dim and leading input dim (the only ones the rules split)."""
    frozen = split_params(param_shardings(cfg, mesh), mode)[1]
    if dtype is not None and wants_backward_kernels(dtype, mesh, transposed_copies):

        def transposed(name, sharding):
            spec = tuple(sharding.spec) + (None,) * 8
            return NamedSharding(mesh, P(spec[kernel_in_dims(name)], spec[0]))

        frozen = _add_kernels_t(frozen, transposed)
    return stacking.stack_shardings(frozen) if stacked else frozen


def prepare_frozen(cfg: NeoXConfig, frozen: dict, dtype, mesh, mode: str, transposed_copies: bool = True) -> dict:
    """The frozen params as the train and eval steps take them: where wants_backward_kernels(...), with a
    physically transposed [O, I] copy of each kernel beside it as "kernel_t" (model.matmul_f32; unrolled layers)."""
    if not wants_backward_kernels(dtype, mesh, transposed_copies):
        return frozen
    return jax.device_put(
        _add_kernels_t(frozen, transpose_kernel), frozen_shardings(cfg, mesh, mode, dtype, transposed_copies)
    )


def load_for_training(
    path, mode: str, dtype, mesh, transposed_copies: bool = True, seed: int = 0, stacked: bool = False
):
    """Reads a checkpoint group by group onto the mesh (each device reads its slice): (cfg, trainable float32 masters,
    frozen params in dtype, prepared for the steps by prepare_frozen). LoRA: fresh adapters from `seed`. stacked:
    both trees in the stacked layout (training/stacking.py: the train step under --remat)."""
    cfg = checkpoint.read_config(path)
    shardings = param_shardings(cfg, mesh)
    trainable, frozen = {}, {}
    for name, tree in checkpoint.iter_groups(path, shardings=lambda g: checkpoint.get_group(shardings, g)):
        group: dict = {}
        checkpoint.set_group(group, name, tree)
        t, f = split_params(group, mode)
        trainable = merge_params(cast(t, F32), trainable)
        frozen = merge_params(cast(f, dtype), frozen)
    if lora.is_lora(mode):
        trainable = lora.init_adapters(cfg, mode, seed, lora.adapter_shardings(cfg, mode, mesh))
    frozen = prepare_frozen(cfg, frozen, dtype, mesh, mode, transposed_copies)
    if stacked:
        trainable = stacking.stack_arrays(trainable, trainable_shardings(cfg, mesh, mode, stacked=True))
        frozen = stacking.stack_arrays(
            frozen, frozen_shardings(cfg, mesh, mode, dtype, transposed_copies, stacked=True)
        )
    return cfg, trainable, frozen


# ---- optimizer and loss scale -------------------------------------------------------------------------------------


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine", min_lr_ratio: float = 0.1):
    """Linear warm-up to lr over the first warmup_steps updates, then cosine / linear decay to lr * min_lr_ratio at
    total_steps (or constant)."""
    rest = max(total_steps - warmup_steps, 1)
    decays = {
        "cosine": lambda: optax.cosine_decay_schedule(lr, rest, alpha=min_lr_ratio),
        "linear": lambda: optax.linear_schedule(lr, lr * min_lr_ratio, rest),
        "constant": lambda: optax.constant_schedule(lr),
    }
    if kind not in decays:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {list(decays)}")
    if warmup_steps <= 0:
        return decays[kind]()

    def warmup(count):  # lr / warmup_steps at the first update, lr at update warmup_steps
        return lr * jnp.minimum(count + 1, warmup_steps) / warmup_steps

    return optax.join_schedules([warmup, decays[kind]()], [warmup_steps])


def make_optimizer(schedule, grad_clip: float = 1.0, weight_decay: float = 0.0, b1=0.9, b2=0.999, eps=1e-8):
    """clip_by_global_norm then AdamW; the current learning rate is kept in the state (inject_hyperparams)."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
    )
    return optax.chain(optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(), adamw)


def current_lr(opt_state):
    return opt_state[1].hyperparams["learning_rate"]


def init_loss_scale(dynamic: bool, initial: float = 2.0**15) -> dict:
    return {"scale": jnp.asarray(initial if dynamic else 1.0, F32), "counter": jnp.zeros((), jnp.int32)}


def adjust_loss_scale(ls: dict, finite, period: int = 2000, factor: float = 2.0, min_scale: float = 1.0) -> dict:
    """After a step: halve on overflow (not below min_scale), double after `period` finite steps in a row."""
    grow = finite & (ls["counter"] + 1 >= period)
    scale = jnp.where(
        finite, jnp.where(grow, ls["scale"] * factor, ls["scale"]), jnp.maximum(ls["scale"] / factor, min_scale)
    )
    return {"scale": scale, "counter": jnp.where(finite & ~grow, ls["counter"] + 1, 0).astype(jnp.int32)}


# ---- the train step --------------------------------------------------------------------------------------------------


def token_losses(
    cfg: NeoXConfig, params: dict, windows, attention=None, lora_spec=None, lora_key=None, remat: str = "none"
):
    """windows [B, T + 1] int -> per-token cross entropy [B, T] float32 (inputs w[:, :-1], targets w[:, 1:]).
    attention: None (per backend) or "plain" / "xla" / "cudnn" (neox_jax/model/attention.py); lora_spec, lora_key:
    params with unmerged LoRA adapters (model.model_from_params); remat: activation checkpointing per block
    (model.neox.REMAT)."""
    logits = forward(cfg, params, windows[:, :-1], attention=attention, lora=lora_spec, lora_key=lora_key, remat=remat)[
        0
    ]
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])  # logits [B, T, V] float32


def loss_and_grads(
    cfg: NeoXConfig,
    trainable: dict,
    frozen: dict,
    windows,
    dtype,
    scale=1.0,
    attention=None,
    lora_spec=None,
    lora_key=None,
    remat: str = "none",
):
    """(mean loss, float32 gradients of the trainable masters); the loss is scaled by `scale` for differentiation
    and the gradients unscaled. lora_spec: the masters are LoRA adapters (they run in float32, uncast); lora_key: the
    step's dropout key; remat: activation checkpointing per block ("none", "dots", "full": model.REMAT)."""

    def scaled(p):
        p = p if lora_spec is not None else cast(p, dtype)
        loss = token_losses(cfg, merge_params(p, frozen), windows, attention, lora_spec, lora_key, remat).mean()
        return loss * scale, loss

    grads, loss = jax.grad(scaled, has_aux=True)(trainable)
    return loss, jax.tree.map(lambda g: g / scale, grads)


def state_shardings(cfg: NeoXConfig, mesh, mode: str, tx, stacked: bool = False) -> dict:
    """Shardings of the train state: masters and their optimizer moments follow the parameter rules; scalars
    are replicated."""
    rep = NamedSharding(mesh, P())
    p_sh = trainable_shardings(cfg, mesh, mode, stacked)
    opt_abstract = jax.eval_shape(tx.init, abstract_trainable(cfg, mode, stacked))
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, p_sh, transform_non_params=lambda _: rep)
    return {"params": p_sh, "opt_state": opt_sh, "loss_scale": {"scale": rep, "counter": rep}, "rng": rep, "step": rep}


def init_state(
    trainable: dict, tx, shardings: dict, *, dynamic: bool, initial_scale: float = 2.0**15, seed: int = 0
) -> dict:
    """The train state: float32 masters, optimizer state, loss scale, RNG key data (reserved for stochastic
    regularisation: GPT-NeoX trains without dropout; it is split every step and saved) and the step count.
    `trainable` is donated: the state takes over its buffers (no second copy of the masters)."""

    def init(p):
        return {
            "params": p,
            "opt_state": tx.init(p),
            "loss_scale": init_loss_scale(dynamic, initial_scale),
            "rng": jax.random.key_data(jax.random.key(seed)),
            "step": jnp.zeros((), jnp.int32),
        }

    return jax.jit(init, out_shardings=shardings, donate_argnums=0)(trainable)


def make_train_step(
    cfg: NeoXConfig,
    tx,
    dtype,
    mesh,
    mode: str,
    *,
    dynamic: bool,
    scale_period: int = 2000,
    donate: bool = True,
    transposed_copies: bool = True,
    remat: str = "none",
):
    """jit(step)(state, frozen, windows [B, T + 1]) -> (state, metrics): batch split over `data`, params and
    optimizer state per the sharding rules. A step with non-finite gradients changes nothing but the loss scale and
    the step count (metrics["skipped"]). remat: activation checkpointing per block (model.neox.REMAT); with it the
    state and frozen params are in the stacked layout (training/stacking.py)."""
    stacked = stacking.stacked_for(remat)
    st_sh = state_shardings(cfg, mesh, mode, tx, stacked)
    rep = NamedSharding(mesh, P())
    spec = mode if lora.is_lora(mode) else None

    def step(state, frozen, windows):
        rng, key = jax.random.split(jax.random.wrap_key_data(state["rng"]))  # key: this step's LoRA dropout
        key = key if spec is not None and spec.dropout else None
        loss, grads = loss_and_grads(
            cfg,
            state["params"],
            frozen,
            windows,
            dtype,
            state["loss_scale"]["scale"],
            lora_spec=spec,
            lora_key=key,
            remat=remat,
        )
        grad_norm = optax.global_norm(grads)
        # an inf or NaN anywhere makes the norm non-finite (so does a norm beyond float32's range, ~1.8e19): one
        # pass over the gradients instead of an is-finite pass per tensor
        finite = jnp.isfinite(grad_norm)

        def update(_):
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            return optax.apply_updates(state["params"], updates), opt_state

        # only the taken branch runs: a skipped step reads nothing, and an applied one does not select between
        # old and new copies of every parameter and moment (that doubled the optimizer's memory traffic)
        params, opt_state = jax.lax.cond(finite, update, lambda _: (state["params"], state["opt_state"]), None)
        ls = adjust_loss_scale(state["loss_scale"], finite, scale_period) if dynamic else state["loss_scale"]
        new = {
            "params": params,
            "opt_state": opt_state,
            "loss_scale": ls,
            "rng": jax.random.key_data(rng),
            "step": state["step"] + 1,
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": current_lr(opt_state),
            "loss_scale": state["loss_scale"]["scale"],
            "skipped": ~finite,
        }
        return new, metrics

    return jax.jit(
        step,
        in_shardings=(
            st_sh,
            frozen_shardings(cfg, mesh, mode, dtype, transposed_copies, stacked),
            batch_sharding(mesh),
        ),
        out_shardings=(st_sh, rep),
        donate_argnums=(0,) if donate else (),
    )


def make_eval_step(cfg: NeoXConfig, dtype, mesh, mode: str, transposed_copies: bool = True, stacked: bool = False):
    """jit(ev)(masters, frozen, windows [B, T + 1], weights [B]) -> (sum of weighted per-window mean losses,
    sum of weights)."""
    trainable_sh = trainable_shardings(cfg, mesh, mode, stacked)
    frozen_sh = frozen_shardings(cfg, mesh, mode, dtype, transposed_copies, stacked)
    spec = mode if lora.is_lora(mode) else None

    def ev(trainable, frozen, windows, weights):
        trainable = trainable if spec is not None else cast(trainable, dtype)
        per_window = token_losses(cfg, merge_params(trainable, frozen), windows, lora_spec=spec).mean(-1)  # [B]
        return jnp.sum(per_window * weights), jnp.sum(weights)

    return jax.jit(
        ev,
        in_shardings=(trainable_sh, frozen_sh, batch_sharding(mesh), batch_sharding(mesh, 1)),
        out_shardings=NamedSharding(mesh, P()),
    )


# ---- the fine-tuned parameters as a small checkpoint ----------------------------------------------------------------


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _str_keys(tree):
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _shapes(tree, dtype=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)


def mode_to_meta(mode) -> dict:
    return {"trainable": "lora", "lora": mode.to_dict()} if lora.is_lora(mode) else {"trainable": mode}


def mode_from_meta(meta: dict):
    """The `mode` a finetuned/metadata.json describes: "biases", "all" or a LoraSpec."""
    return lora.LoraSpec.from_dict(meta["lora"]) if meta["trainable"] == "lora" else meta["trainable"]


def save_finetuned(run_dir, cfg: NeoXConfig, mode: str, trainable: dict, info: dict | None = None) -> Path:
    """Writes RUN_DIR/finetuned (metadata.json + params/, the float32 trainable subset) under a temporary name,
    then swaps it in: a crash leaves the previous one readable."""
    out = Path(run_dir).absolute() / FINETUNED
    tmp = out.with_name(f"{FINETUNED}.tmp-{uuid.uuid4().hex[:8]}")
    host = stacking.unstack_host(jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), trainable))
    try:
        _checkpointer().save(tmp / "params", args=ocp.args.StandardSave(host))
        meta = {
            "format": FORMAT,
            "format_version": 1,
            "config": cfg.to_dict(),
            **mode_to_meta(mode),
            "num_trainable": int(sum(x.size for x in jax.tree.leaves(host))),
            **(info or {}),
        }
        meta["checksums"] = checksums.section(checksums.record(tmp, "params"))  # `neox-jax convert verify` reads it
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f"{FINETUNED}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_finetuned(run_dir) -> tuple[dict, dict]:
    """(metadata, float32 trainable params on the default device) of RUN_DIR/finetuned."""
    d = Path(run_dir).absolute() / FINETUNED  # Orbax reads no metadata from a relative path
    meta_file = d / "metadata.json"
    if not meta_file.is_file():
        raise checkpoint.CheckpointError(
            f"{run_dir}: no {FINETUNED}/metadata.json (not a fine-tuning run directory, "
            f"or its run has not saved yet: resume it with --resume to finish)"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise checkpoint.CheckpointError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = NeoXConfig.from_dict(meta["config"])
    want = abstract_trainable(cfg, mode_from_meta(meta))
    ckptr = _checkpointer()
    found = checkpoint.stored_tree(ckptr, d / "params")  # Orbax metadata spells the layer keys as strings
    checkpoint.compare_trees(_str_keys(want), _str_keys(found), str(d / "params"))
    return meta, ckptr.restore(d / "params", args=ocp.args.StandardRestore(_shapes(want)))


def apply_finetuned(params: dict, cfg: NeoXConfig, run_dir) -> dict:
    """params with the run's trained tensors in place, each cast to the dtype (and put on the sharding) of the
    tensor it replaces."""
    meta, trained = load_finetuned(run_dir)
    if NeoXConfig.from_dict(meta["config"]) != cfg:
        raise checkpoint.CheckpointError(
            f"{run_dir}: fine-tuned for a different model config than this checkpoint's "
            f"({meta['config']} vs {cfg.to_dict()})"
        )
    mode = mode_from_meta(meta)
    if lora.is_lora(mode):  # folded into the kernels (W + scale * A @ B): inference runs at the base model's cost
        return lora.merge_adapters(params, trained, mode.scale)
    old = split_params(params, mode)[0]
    checkpoint.compare_trees(_shapes(trained, F32), _shapes(old, F32), f"{run_dir} vs the loaded checkpoint")
    new = jax.tree.map(lambda t, o: jax.device_put(jnp.asarray(t).astype(o.dtype), o.sharding), trained, old)
    return merge_params(new, params)
