"""GPT-NeoX slim-weight shards (the published GPT-NeoX-20B, any tensor-parallel degree) -> neox-jax checkpoint.

    neox-jax convert neox SRC OUT [--dtype float16|bfloat16|float32] [--config FILE] [--allow-nonfinite] [--quiet]

SRC as published: `20B_tokenizer.json`, `configs/20B.yml`, `latest` (names the step folder),
`global_stepN/layer_LL-model_RR-model_states.pt` (the weights) and `mp_rank_XX_model_states.pt` (engine state, no
weights: never opened). The layout and merge rules are in convert/neox_layout.py, the YAML reading in
convert/neox_yaml.py. One pipeline layer's rank files are open at a time, with torch.load(weights_only=True, mmap=True):
peak memory follows the largest layer, not the model. Merged tensors go through the same HF name map and transforms
as `convert hf` (convert/mapping.py), so the name map lives in one place.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from neox_jax.model.config import NeoXConfig
from neox_jax.store.checkpoint import DTYPE_CHOICES, CheckpointWriter, dtype_name

from .hf import cast_checked
from .mapping import group_entries, set_path
from .neox_layout import BUFFER, CAT0, CAT1, REPLICATED, SUM, SlimLayer, inv_freq, layer_file, plan
from .neox_yaml import NeoxModelArgs, model_args, read_neox_args
from .sources import ConvertError, torch_load, torch_to_numpy

LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
DEFAULT_REPLICATED_TOL = 0.05


def find_configs(src: Path, config=None) -> list[Path]:
    if config:
        return [Path(c) for c in config]
    default = src / "configs" / "20B.yml"
    if default.is_file():
        return [default]
    found = sorted(
        p for d in (src / "configs", src) if d.is_dir() for p in d.iterdir() if p.suffix in (".yml", ".yaml")
    )
    if len(found) != 1:
        raise ConvertError(
            f"{src}: {'several' if found else 'no'} GPT-NeoX YAML configs found "
            f"({[p.name for p in found]}); name it with --config FILE"
        )
    return found


def find_step_dir(src: Path) -> Path:
    latest = src / "latest"
    if latest.is_file():
        step = latest.read_text().strip()
        if not (src / step).is_dir():
            raise ConvertError(f"{latest}: names step folder {step!r}, which does not exist in {src}")
        return src / step
    steps = sorted(p for p in src.glob("global_step*") if p.is_dir())
    if len(steps) != 1:
        raise ConvertError(
            f"{src}: no 'latest' file and {len(steps)} global_step* folders; expected the slim-weights "
            f"folder (latest, configs/, global_stepN/)"
        )
    return steps[0]


def scan_layer_files(step_dir: Path) -> tuple[dict[tuple[int, int], Path], int]:
    """{(layer index, tp rank): path} for every layer file (mp_rank_* and other files are not looked at) and the
    tensor-parallel degree: the number of ranks present."""
    files = {}
    for p in step_dir.iterdir():
        m = LAYER_FILE.fullmatch(p.name)
        if m:
            files[int(m[1]), int(m[2])] = p
    if not files:
        raise ConvertError(f"{step_dir}: no layer_LL-model_RR-model_states.pt files")
    return files, max(r for _, r in files) + 1


def find_tokenizer(src: Path, vocab_file: str | None) -> Path | None:
    names = ([Path(vocab_file).name] if vocab_file else []) + ["20B_tokenizer.json", "tokenizer.json"]
    for name in names:
        if name.endswith(".json") and (src / name).is_file():
            return src / name
    return None


def prepare(src, config=None) -> tuple[NeoxModelArgs, NeoXConfig, int, Path, list[SlimLayer], str]:
    """Reads the YAML and the file list (not the weights); returns (args, config, tp, step dir, plan, source dtype)."""
    src = Path(src)
    if not src.is_dir():
        raise ConvertError(f"{src}: no such directory (expected the slim-weights folder)")
    cfg_files = find_configs(src, config)
    args = model_args(read_neox_args(cfg_files), ", ".join(map(str, cfg_files)))
    step_dir = find_step_dir(src)
    files, tp = scan_layer_files(step_dir)
    first = step_dir / layer_file(0, 0)
    if not first.is_file():
        raise ConvertError(f"{first}: missing (the embedding layer, tensor word_embeddings.weight, rank 0)")
    emb = torch_load(first)
    if not isinstance(emb, dict) or "word_embeddings.weight" not in emb:
        raise ConvertError(f"{first}: tensor word_embeddings.weight missing")
    rows, src_dtype = emb["word_embeddings.weight"].shape[0], str(emb["word_embeddings.weight"].dtype)[6:]
    del emb
    try:
        cfg = args.config(vocab_size=rows * tp)
        layers = plan(cfg, tp, args.tied_embeddings, args.output_layer_parallelism)
    except ValueError as e:
        raise ConvertError(f"{cfg_files[0]}: with tensor-parallel degree {tp} (from the files): {e}") from None
    wanted = {(layer.index, r) for layer in layers for r in range(tp)}
    missing = sorted(wanted - set(files))
    if missing:
        ll, rr = missing[0]
        layer = next(x for x in layers if x.index == ll)
        raise ConvertError(
            f"{step_dir / layer_file(ll, rr)}: missing rank file (tensor-parallel degree {tp} from the "
            f"files present; it holds {[t.name for t in layer.tensors]}); {len(missing)} missing in all"
        )
    extra = sorted({ll for ll, _ in files} - {ll for ll, _ in wanted})
    if extra:
        raise ConvertError(
            f"{step_dir}: unexpected layer files layer_{extra[0]:02d}-* (num-layers is "
            f"{cfg.num_hidden_layers} in {cfg_files[0]}, so layers 0, 2..{cfg.num_hidden_layers + 1}, "
            f"{cfg.num_hidden_layers + 3}, {cfg.num_hidden_layers + 4} are expected)"
        )
    return args, cfg, tp, step_dir, layers, src_dtype


def _merge(t, parts: list[np.ndarray], where: str, tol: float, cfg: NeoXConfig, worst: dict) -> np.ndarray | None:
    if t.merge == CAT0:
        return np.concatenate(parts, axis=0)
    if t.merge == CAT1:
        return np.concatenate(parts, axis=1)
    if t.merge == SUM:  # each rank adds its own copy before the all-reduce: the effective bias is the sum
        return np.sum([p.astype(np.float32) for p in parts], axis=0)
    if t.merge == BUFFER:
        want = inv_freq(cfg)
        rel = float(np.max(np.abs(parts[0].astype(np.float32) - want) / want)) if want.size else 0.0
        if rel > 1e-2:
            raise ConvertError(
                f"{where}: values disagree with rotary_pct {cfg.rotary_pct} / rotary_emb_base "
                f"{cfg.rotary_emb_base:g} from the config (largest relative difference {rel:.3g})"
            )
        return None
    assert t.merge == REPLICATED
    ref = parts[0].astype(np.float32)
    diff = max((float(np.max(np.abs(p.astype(np.float32) - ref))) for p in parts[1:]), default=0.0)
    if diff > worst["diff"] or worst["tensor"] is None:
        worst.update(diff=diff, tensor=where)
    if diff > tol * max(1.0, float(np.max(np.abs(ref)))):
        raise ConvertError(
            f"{where}: replicated tensor differs between tensor-parallel ranks by up to {diff:.4g} "
            f"(tolerance {tol:g} x max(1, max|x|); --replicated-tol to accept)"
        )
    # equal copies: take one; a small drift between ranks (the published 20B has some): the mean, as GPT-NeoX's own
    # tools/merge20b.py and the HF 20B weights do
    return parts[0] if diff == 0 else np.mean([p.astype(np.float32) for p in parts], axis=0)


def convert_layer(
    step_dir: Path,
    layer: SlimLayer,
    tp: int,
    cfg: NeoXConfig,
    dtype: str,
    allow_nonfinite: bool,
    tol: float,
    worst: dict,
) -> dict:
    """Loads the tp rank files of one pipe layer, checks and merges them, returns the group tree (checkpoint dtype)."""
    paths = [step_dir / layer.file(r) for r in range(tp)]
    states, names = [], [t.name for t in layer.tensors]
    for p in paths:
        try:
            state = torch_load(p)
        except ConvertError as e:
            raise ConvertError(f"{e} (it should hold tensors {names})") from None
        if not isinstance(state, dict):
            raise ConvertError(f"{p}: expected a dict of tensors {names}, found {type(state).__name__}")
        missing = [t.name for t in layer.tensors if t.name not in state and t.merge != BUFFER]
        unexpected = sorted(set(state) - set(names))
        if missing or unexpected:
            raise ConvertError(
                f"{p}: "
                + "; ".join(
                    ([f"missing tensors {missing}"] if missing else [])
                    + ([f"unexpected tensors {unexpected}"] if unexpected else [])
                )
            )
        states.append(state)
    entries = {e.hf_name: e for e in group_entries(cfg, layer.group)}
    tree: dict = {}
    for t in layer.tensors:
        if t.name not in states[0]:
            continue  # an optional buffer
        parts = []
        for r, (p, state) in enumerate(zip(paths, states)):
            where = f"{p}: tensor {t.name}"
            x = torch_to_numpy(state[t.name], where)
            if tuple(x.shape) != t.rank_shape:
                raise ConvertError(
                    f"{where}: expected shape {list(t.rank_shape)} for rank {r} of {tp} "
                    f"({t.merge} -> {list(t.merged_shape)}, from the config), found {list(x.shape)}"
                )
            if not allow_nonfinite and not np.isfinite(x).all():
                raise ConvertError(f"{where}: contains NaN/Inf values (pass --allow-nonfinite to keep them)")
            parts.append(x)
        where = f"{step_dir / f'layer_{layer.index:02d}-model_*-model_states.pt'}: tensor {t.name}"
        merged = _merge(t, parts, where, tol, cfg, worst)
        del parts
        if merged is None:
            continue
        e = entries.pop(t.hf_name)
        assert merged.shape == e.hf_shape, (t, merged.shape, e.hf_shape)
        set_path(tree, e.path, cast_checked(e.to_ours(merged), dtype, where, allow_nonfinite))
        del merged
    if entries:
        raise AssertionError(f"layout plan leaves {sorted(entries)} unfilled")  # plan and mapping disagree: a bug
    return tree


def convert_neox(
    src, out, dtype=None, config=None, allow_nonfinite=False, replicated_tol=DEFAULT_REPLICATED_TOL, progress=True
) -> dict:
    src, out = Path(src), Path(out)
    args, cfg, tp, step_dir, layers, src_dtype = prepare(src, config)
    dtype = dtype_name(dtype or src_dtype)
    tokenizer = find_tokenizer(src, args.vocab_file)
    t0, read, worst = time.time(), 0, {"diff": 0.0, "tensor": None}
    source = {
        "kind": "neox-slim",
        "path": str(src.absolute()),
        "step": step_dir.name,
        "tensor_parallel": tp,
        "source_dtype": src_dtype,
    }
    with CheckpointWriter(out, cfg, dtype, source) as writer:
        bar = tqdm(layers, desc="convert", unit="layer", disable=not progress)
        for layer in bar:
            bar.set_description(f"layer_{layer.index:02d} -> {layer.group}")
            tree = convert_layer(step_dir, layer, tp, cfg, dtype, allow_nonfinite, replicated_tol, worst)
            writer.write_group(layer.group, tree)
            del tree
            read += sum((step_dir / layer.file(r)).stat().st_size for r in range(tp))
            bar.set_postfix(MB_s=f"{read / 1e6 / max(time.time() - t0, 1e-9):.0f}")
        if tokenizer is not None:
            writer.add_file(tokenizer, "tokenizer.json")
        path = writer.finish()
    seconds = time.time() - t0
    if progress:
        print(
            f"merged tensor-parallel {tp} ({step_dir.name}, {src_dtype}); replicated tensors differ between ranks "
            f"by at most {worst['diff']:.3g}"
            + (f" ({worst['tensor']})" if worst["diff"] else "")
            + f"; tokenizer: {tokenizer.name if tokenizer else 'none found'}"
        )
    return {
        "out": str(path),
        "params": cfg.num_params,
        "bytes": writer.bytes,
        "seconds": seconds,
        "dtype": dtype,
        "tensor_parallel": tp,
        "source_bytes": read,
        "source_mb_per_s": read / 1e6 / max(seconds, 1e-9),
        "replicated_max_diff": worst["diff"],
        "replicated_max_diff_tensor": worst["tensor"],
        "tokenizer": str(tokenizer) if tokenizer else None,
    }


def _run(a):
    return convert_neox(a.src, a.out, a.dtype, a.config, a.allow_nonfinite, a.replicated_tol, progress=not a.quiet)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "neox",
        help="GPT-NeoX slim-weight shards (e.g. the published GPT-NeoX-20B) -> neox-jax checkpoint",
        description="Merge the tensor-parallel slim shards GPT-NeoX writes (global_stepN/layer_LL-model_RR-"
        "model_states.pt, any tensor-parallel degree, read from the files) into one neox-jax checkpoint, "
        "one pipeline layer at a time. The model config comes from configs/20B.yml (GPT-NeoX YAML).",
    )
    p.add_argument("src", help="slim-weights folder: configs/*.yml, latest, global_stepN/, 20B_tokenizer.json")
    p.add_argument("out", help="output checkpoint directory (must not exist; appears only when complete)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="stored parameter dtype (default: the shards' own, float16 for 20B)",
    )
    p.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="GPT-NeoX YAML config (repeatable, merged like GPT-NeoX; default SRC/configs/20B.yml)",
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf weights instead of refusing them")
    p.add_argument(
        "--replicated-tol",
        type=float,
        default=DEFAULT_REPLICATED_TOL,
        help="largest difference allowed between ranks' copies of a replicated tensor, times "
        f"max(1, max|x|) (default {DEFAULT_REPLICATED_TOL}); within it the copies are averaged",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(convert=_run)
