"""Hugging Face GPTNeoXForCausalLM <-> neox-jax checkpoint.

`convert_hf` reads a `save_pretrained` directory tensor by tensor (one layer in memory at a time) and writes a neox-jax
checkpoint; `export_hf` writes a checkpoint back as a HF directory (config.json, sharded safetensors with an index, the
tokenizer) that `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from neox_jax.errors import NeoXWarning
from neox_jax.model.config import NeoXConfig
from neox_jax.store.checkpoint import (
    DTYPES,
    CheckpointWriter,
    dtype_name,
    group_names,
    iter_groups,
    read_metadata,
)
from neox_jax.store.staging import Staging

from .mapping import IGNORED_SUFFIXES, get_path, group_entries, set_path
from .sources import ConvertError, HFTensors

# files of a Hugging Face folder that travel with the checkpoint (and back out with to-hf)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
OUTPUT_ALIASES = ("lm_head.weight",)  # transformers 5 names embed_out "lm_head" in memory; accept it in files too


def cast_checked(x: np.ndarray, dtype, where: str, allow_nonfinite: bool) -> np.ndarray:
    """Casts to the checkpoint dtype; NaN/Inf (in the source, or made by overflow in the cast) is an error."""
    y = x.astype(DTYPES[dtype_name(dtype)], copy=False)  # no copy (and no second check) when already that dtype
    if not allow_nonfinite:
        if not np.isfinite(x).all():
            raise ConvertError(f"{where}: contains NaN/Inf values (pass --allow-nonfinite to keep them)")
        if y.dtype != x.dtype and not np.isfinite(y).all():
            big = float(np.abs(x).max())
            raise ConvertError(
                f"{where}: values up to {big:g} overflow {dtype_name(dtype)} (use --dtype bfloat16 or "
                f"float32, or --allow-nonfinite)"
            )
    return y


def read_hf_config(src: Path) -> NeoXConfig:
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{src}: no config.json (expected a save_pretrained directory of GPTNeoXForCausalLM)")
    try:
        return NeoXConfig.from_json_file(cfg_file)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{cfg_file}: not valid JSON ({e})") from None
    except ValueError as e:
        raise ConvertError(str(e)) from None


def convert_hf(src, out, dtype="float32", allow_nonfinite=False, progress=True, hub: dict | None = None) -> dict:
    """hub: where SRC came from (neox_jax.store.hub.HubFiles.source_record()), recorded in metadata.json `source`."""
    src, out = Path(src), Path(out)
    cfg = read_hf_config(src)
    tensors = HFTensors(src)
    names = tensors.names()
    aliases = {a: "embed_out.weight" for a in OUTPUT_ALIASES if a in names and "embed_out.weight" not in names}
    canonical = {aliases.get(n, n): n for n in names}  # canonical HF name -> name in the files
    expected = {e.hf_name for g in group_names(cfg) for e in group_entries(cfg, g)}
    ignored = sorted(n for n in names if n.endswith(IGNORED_SUFFIXES))
    unexpected = sorted(n for n in canonical if n not in expected and canonical[n] not in ignored)
    missing = sorted(n for n in expected if n not in canonical)
    if missing or unexpected:
        parts = ([f"missing tensors {missing}"] if missing else []) + (
            [f"unexpected tensors {unexpected}"] if unexpected else []
        )
        raise ConvertError(f"{src}: " + "; ".join(parts))
    if not (src / "tokenizer.json").is_file():
        warnings.warn(
            f"{src}: no tokenizer.json, so the checkpoint will take token ids only (for text, pass "
            f"--tokenizer FILE, or copy a tokenizer.json into {src} and convert again)",
            NeoXWarning,
            stacklevel=2,
        )
    t0 = time.time()
    source = {"kind": "hf", "path": str(src.absolute()), "files": tensors.kind, **(hub or {})}
    with CheckpointWriter(out, cfg, dtype, source) as writer:
        bar = tqdm(group_names(cfg), desc="convert", unit="group", disable=not progress)
        for group in bar:
            tree: dict = {}
            for e in group_entries(cfg, group):
                name = canonical[e.hf_name]
                where = f"{tensors.file_of[name]}: tensor {name}"
                x = tensors.get(name)
                if tuple(x.shape) != e.hf_shape:
                    raise ConvertError(
                        f"{where}: expected shape {list(e.hf_shape)} from config.json, found {list(x.shape)}"
                    )
                set_path(tree, e.path, cast_checked(e.to_ours(x), dtype, where, allow_nonfinite))
            writer.write_group(group, tree)
            bar.set_postfix(MB_s=f"{writer.bytes / 1e6 / max(time.time() - t0, 1e-9):.0f}")
        for name in SIDE_FILES:
            if (src / name).is_file():
                writer.add_file(src / name, name)
        path = writer.finish()
    return {
        "out": str(path),
        "params": cfg.num_params,
        "bytes": writer.bytes,
        "seconds": time.time() - t0,
        "ignored_buffers": len(ignored),
        "dtype": dtype_name(dtype),
    }


def tokenizer_config(max_length: int) -> dict:
    """The tokenizer_config.json transformers needs beside a GPT-NeoX tokenizer.json (AutoTokenizer then loads it)."""
    return {
        "tokenizer_class": "GPTNeoXTokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_length,
    }


def export_hf(ckpt, out, dtype=None, shard_bytes=2 * 2**30, progress=True) -> dict:
    """neox-jax checkpoint -> HF directory. Streams group by group; shards of at most shard_bytes."""
    import torch
    from safetensors.torch import save_file

    ckpt, out = Path(ckpt), Path(out)
    meta = read_metadata(ckpt)
    cfg = NeoXConfig.from_dict(meta["config"])
    dtype = dtype_name(dtype or meta["dtype"])
    if out.exists():
        raise ConvertError(f"{out} already exists; choose another output directory or remove it")
    staging = Staging(out, what="Hugging Face export")  # OUT.tmp-*: stale ones removed, disk full / SIGTERM clean up
    tmp = staging.tmp
    t0, total, shard, shard_size, weight_map, shard_files = time.time(), 0, {}, 0, {}, []

    def flush():
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(shard_files) + 1:05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            shard_files.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_size = {}, 0

    with staging:
        for group, tree in tqdm(
            iter_groups(ckpt, dtype), total=len(group_names(cfg)), desc="to-hf", unit="group", disable=not progress
        ):
            for e in group_entries(cfg, group):
                arr = np.asarray(get_path(tree, e.path))
                t = torch.from_numpy(np.ascontiguousarray(e.to_hf(arr.astype(np.float32))))
                t = t.to({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
                nbytes = t.numel() * t.element_size()
                if shard and shard_size + nbytes > shard_bytes:
                    flush()
                shard[e.hf_name] = t.contiguous()
                shard_size += nbytes
                total += nbytes
        flush()
        # rename shards to the HF "-of-" convention now that the count is known
        n = len(shard_files)
        renames = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(shard_files)}
        for old, new in renames.items():
            (tmp / old).rename(tmp / new)
        index = {"metadata": {"total_size": total}, "weight_map": {k: renames[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_cfg = cfg.to_hf_config()
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for name in SIDE_FILES:
            if (ckpt / name).is_file():
                shutil.copyfile(ckpt / name, tmp / name)
        if (ckpt / "tokenizer.json").is_file() and not (ckpt / "tokenizer_config.json").is_file():
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(tokenizer_config(cfg.max_position_embeddings), indent=2) + "\n"
            )
        staging.commit()
    return {"out": str(out), "params": cfg.num_params, "bytes": total, "seconds": time.time() - t0, "dtype": dtype}
