"""neox-jax convert merge CKPT RUN_DIR OUT: fold a fine-tuning run's trained parameters into a full checkpoint.

Streams the base checkpoint group by group (one layer in memory at a time), replaces the tensors the run trained
(RUN_DIR/finetuned, float32 masters, cast to the output dtype) and writes OUT with CheckpointWriter; every other
tensor is copied bit for bit. `neox_jax.load(OUT)` then gives the logits of `neox_jax.load(CKPT, finetuned=RUN_DIR)`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from neox_jax.model import lora
from neox_jax.model.config import NeoXConfig
from neox_jax.store.checkpoint import (
    DTYPE_CHOICES,
    DTYPES,
    CheckpointError,
    CheckpointWriter,
    dtype_name,
    get_group,
    group_names,
    iter_groups,
    read_metadata,
    set_group,
)
from neox_jax.training.step import load_finetuned, merge_params, mode_from_meta, split_params


def merge(ckpt, run_dir, out, dtype=None, progress=True) -> dict:
    ckpt, out = Path(ckpt), Path(out)
    meta = read_metadata(ckpt)
    cfg = NeoXConfig.from_dict(meta["config"])
    dtype = dtype_name(dtype or meta["dtype"])
    ft_meta, trained = load_finetuned(run_dir)
    if NeoXConfig.from_dict(ft_meta["config"]) != cfg:
        raise CheckpointError(f"{run_dir} was fine-tuned for a different model config than {ckpt}")
    mode, t0, replaced = mode_from_meta(ft_meta), time.time(), 0
    source = {
        "kind": "merge",
        "base": str(ckpt.absolute()),
        "finetuned": str(Path(run_dir).absolute()),
        "trainable": ft_meta["trainable"],
        "step": ft_meta.get("step"),
    }
    with CheckpointWriter(out, cfg, dtype, source) as writer:
        for name, tree in tqdm(
            iter_groups(ckpt), total=len(group_names(cfg)), desc="merge", unit="group", disable=not progress
        ):
            if lora.is_lora(mode):  # LoRA: W + scale * A @ B in float32 for each adapted kernel
                adapters = trained["layers"].get(int(name.split(".")[1]), {}) if name.startswith("layers.") else {}
                replaced += sum(np.size(tree[p][n]["kernel"]) for p, linears in adapters.items() for n in linears)
                writer.write_group(
                    name,
                    _to_numpy(
                        lora.merge_layer(tree, _to_numpy(adapters, np.float32), mode.scale) if adapters else tree,
                        DTYPES[dtype],
                    ),
                )
                continue
            whole: dict = {}
            set_group(whole, name, tree)
            frozen = split_params(whole, mode)[1]
            frozen = get_group(frozen, name) if _has_group(frozen, name) else {}
            new = get_group(trained, name) if _has_group(trained, name) else {}  # this group's trained tensors
            replaced += sum(np.size(x) for x in _leaves(new))
            merged = merge_params(new, frozen)
            writer.write_group(name, _to_numpy(merged, DTYPES[dtype]))
        if (ckpt / "tokenizer.json").is_file():
            writer.add_file(ckpt / "tokenizer.json", "tokenizer.json")
        path = writer.finish()
    return {
        "out": str(path),
        "params": cfg.num_params,
        "bytes": writer.bytes,
        "seconds": time.time() - t0,
        "dtype": dtype,
        "replaced": replaced,
    }


def _has_group(tree: dict, name: str) -> bool:
    if name.startswith("layers."):
        return int(name.split(".")[1]) in tree.get("layers", {})
    return name in tree


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def _to_numpy(tree, dtype):
    if isinstance(tree, dict):
        return {k: _to_numpy(v, dtype) for k, v in tree.items()}
    return np.asarray(tree).astype(dtype)


def _run(a):
    return merge(a.ckpt, a.run_dir, a.out, a.dtype, progress=not a.quiet)


def register(subparsers) -> None:
    m = subparsers.add_parser(
        "merge",
        help="base checkpoint + fine-tuning run -> full fine-tuned checkpoint",
        description=__doc__.split("\n\n")[1],
    )
    m.add_argument("ckpt", help="the base neox-jax checkpoint the run fine-tuned")
    m.add_argument("run_dir", help="the fine-tuning run directory (neox-jax finetune --out)")
    m.add_argument("out", help="output checkpoint directory (must not exist; appears only when complete)")
    m.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="stored dtype (default: the base's)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(convert=_run)
