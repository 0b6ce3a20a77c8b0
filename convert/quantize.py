"""neox-jax convert quantize CKPT OUT [--mode int8|llm.int8]: a float neox-jax checkpoint -> an int8 one.

Streams group by group (one layer in memory at a time), so the host never holds the float model: read a group,
quantize its block matrices (int8 kernels, float32 per-output-channel scales; see neox_jax/model/quantize.py), write it.
Everything else (embeddings, layernorms, biases) keeps the source dtype. metadata.json records the quantization, so
`neox_jax.load(OUT)` loads it quantized with no further argument.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from neox_jax.model import quantize
from neox_jax.model.config import NeoXConfig
from neox_jax.store.checkpoint import CheckpointWriter, group_names, iter_groups, read_metadata

from .sources import ConvertError


def quantize_checkpoint(
    ckpt,
    out,
    mode: str = "llm.int8",
    threshold: float = quantize.DEFAULT_THRESHOLD,
    embed_out: bool = False,
    progress: bool = True,
) -> dict:
    ckpt, out = Path(ckpt), Path(out)
    meta = read_metadata(ckpt)
    if meta.get("quantization"):
        raise ConvertError(
            f"{ckpt}: already quantized ({meta['quantization']['mode']}); quantize the float "
            f"checkpoint, or load this one with neox_jax.load(..., quantize=MODE) to switch modes"
        )
    cfg = NeoXConfig.from_dict(meta["config"])
    spec = quantize.QuantSpec(mode, embed_out)
    qmeta = {
        "mode": mode,
        "embed_out": embed_out,
        "threshold": threshold if mode == "llm.int8" else None,
        "targets": list(quantize.int8_targets(spec)),
        "weights": quantize.WEIGHT_FORMAT,
    }
    t0 = time.time()
    source = {"kind": "quantize", "path": str(ckpt.absolute()), "source": meta.get("source", {})}
    with CheckpointWriter(out, cfg, meta["dtype"], source, quantization=qmeta) as writer:
        groups = iter_groups(ckpt)
        for name, tree in tqdm(
            groups, total=len(group_names(cfg)), desc="quantize", unit="group", disable=not progress
        ):
            q = quantize.quantize_tree({name: tree}, mode, threshold, embed_out)[name]
            writer.write_group(name, jax.tree.map(np.asarray, q))
            del tree, q
        if (ckpt / "tokenizer.json").is_file():
            writer.add_file(ckpt / "tokenizer.json", "tokenizer.json")
        path = writer.finish()
    return {
        "out": str(path),
        "params": cfg.num_params,
        "bytes": writer.bytes,
        "seconds": time.time() - t0,
        "dtype": f"{mode}, other params {meta['dtype']}",
        "source_bytes": meta.get("bytes"),
    }


def _run(a):
    return quantize_checkpoint(a.ckpt, a.out, a.mode, a.threshold, a.embed_out, progress=not a.quiet)


def register(subparsers) -> None:
    q = subparsers.add_parser(
        "quantize",
        help="neox-jax checkpoint -> int8 checkpoint (about half of float16)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("ckpt", help="float neox-jax checkpoint directory")
    q.add_argument("out", help="output checkpoint directory (must not exist; appears only when complete)")
    q.add_argument(
        "--mode",
        choices=quantize.MODES,
        default="llm.int8",
        help="int8: weight-only; llm.int8: int8 activations too, outlier features in float (default)",
    )
    q.add_argument(
        "--threshold",
        type=float,
        default=quantize.DEFAULT_THRESHOLD,
        help="llm.int8 outlier threshold on |activation| (default 6.0)",
    )
    q.add_argument("--embed-out", action="store_true", help="quantize the output layer too (default: keep it float)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(convert=_run)
