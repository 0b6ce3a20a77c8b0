"""neox-jax checkpoints: a directory of Orbax checkpoints, one per parameter group, plus metadata and the tokenizer.

    CKPT/
      metadata.json        format version, NeoXConfig, dtype, where it was converted from, the group names,
                           `checksums` (size and sha256 of every stored file, see checksums.py), and for int8
                           checkpoints `quantization` (mode, threshold, targets; see quantize.py)
      tokenizer.json       when the source had one
      params/embed_in/     one Orbax (StandardCheckpointHandler) checkpoint per group: a plain nested dict of arrays
      params/layers.0/ ... params/layers.{L-1}/
      params/final_layer_norm/
      params/embed_out/

One group per layer lets a converter write (and `restore_params` read) one layer at a time, so neither ever holds
the whole model in host memory. The checkpoint is written under a temporary name and renamed when complete: a crash
leaves nothing that looks finished (staging.py: stale temporary directories, disk full, SIGTERM).
Reading checks metadata.json against what is stored (groups, layer count, file sizes, shapes, dtypes) before any
array is read; `verify` re-hashes every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from neox_jax.errors import NeoXError
from neox_jax.model import quantize
from neox_jax.model.config import NeoXConfig
from neox_jax.model.neox import abstract_params
from neox_jax.store import checksums
from neox_jax.store.staging import Staging

FORMAT = "neox-jax-checkpoint"
FORMAT_VERSION = 1
DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
# Arrays are stored in chunks of at most this many bytes (Orbax `chunk_byte_size`), so restoring onto a mesh reads
# each device's slice chunk by chunk instead of decoding the whole array once per device.
CHUNK_BYTES = 32 * 2**20


class CheckpointError(NeoXError):
    """A checkpoint is missing, incomplete or does not match what was expected."""


class ChecksumError(CheckpointError):
    """Stored files differ from the checksums recorded when the checkpoint was written."""


DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # the short names users type
DTYPE_CHOICES = (*DTYPES, *DTYPE_ALIASES)  # what a --dtype flag accepts


def dtype_name(dtype) -> str:
    """'bf16' / jnp.bfloat16 / 'bfloat16' -> 'bfloat16'; an unsupported dtype is a CheckpointError."""
    if isinstance(dtype, str):
        dtype = DTYPE_ALIASES.get(dtype.lower(), dtype)
    try:
        name = jnp.dtype(dtype).name
    except TypeError as e:
        raise CheckpointError(f"unsupported dtype {dtype!r}; expected one of {list(DTYPE_CHOICES)}") from e
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; expected one of {list(DTYPES)}")
    return name


def group_names(cfg: NeoXConfig) -> list[str]:
    return ["embed_in", *[f"layers.{i}" for i in range(cfg.num_hidden_layers)], "final_layer_norm", "embed_out"]


def get_group(params: dict, name: str):
    if name.startswith("layers."):
        return params["layers"][int(name.split(".")[1])]
    return params[name]


def set_group(params: dict, name: str, value) -> None:
    if name.startswith("layers."):
        params.setdefault("layers", {})[int(name.split(".")[1])] = value
    else:
        params[name] = value


def release_freed_memory() -> None:
    """Hands memory freed by the last group back to the OS: glibc keeps freed blocks in per-thread arenas, which made
    a streaming conversion's peak RSS grow with the number of layers (docs/performance.md); restore likewise."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _describe(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): (tuple(x.shape), jnp.dtype(x.dtype).name) for p, x in flat}


def compare_trees(expected, actual, where: str) -> None:
    """Raises CheckpointError listing every missing / unexpected name and every shape or dtype that differs."""
    e, a = _describe(expected), _describe(actual)
    problems = [f"missing {k} (expected shape {e[k][0]} {e[k][1]})" for k in e if k not in a]
    problems += [f"unexpected {k} (shape {a[k][0]} {a[k][1]})" for k in a if k not in e]
    problems += [
        f"{k}: expected shape {e[k][0]} {e[k][1]}, found {a[k][0]} {a[k][1]}" for k in e if k in a and e[k] != a[k]
    ]
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


class CheckpointWriter:
    """Writes a checkpoint group by group under OUT.tmp-*, renamed to OUT by `finish`. Use as a context manager:
    an exception (KeyboardInterrupt, SIGTERM, disk full) removes the temporary directory and leaves OUT untouched
    (neox_jax/store/staging.py). Each file is hashed as it is written (metadata.json `checksums`)."""

    def __init__(
        self,
        out: str | os.PathLike,
        cfg: NeoXConfig,
        dtype,
        source: dict[str, Any] | None = None,
        overwrite: bool = False,
        quantization: dict[str, Any] | None = None,
        chunk_bytes: int | None = CHUNK_BYTES,
    ):
        self.out = Path(out).absolute()
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"{self.out} already exists; choose another output directory or remove it")
        self.cfg, self.dtype = cfg, dtype_name(dtype)
        self.source = source or {}
        self._staging = Staging(self.out, overwrite=overwrite, what="checkpoint")
        self.tmp = self._staging.tmp
        self.files: dict[str, dict] = {}  # relative path -> {"bytes", "sha256"}
        self.quantization = quantization  # quantize.describe(params): int8 kernels, float32 scales
        self.expected = abstract_params(cfg, DTYPES[self.dtype], quant=quantize.spec_from_metadata(quantization))
        self.written: set[str] = set()
        self.bytes = 0
        self.overwrite = overwrite
        self.chunk_bytes = chunk_bytes  # None: one chunk per array
        self._ckptr = _checkpointer()

    def __enter__(self):
        self._staging.__enter__()
        (self.tmp / "params").mkdir()
        return self

    def __exit__(self, exc_type, exc, tb):
        return self._staging.__exit__(exc_type, exc, tb)

    def write_group(self, name: str, tree) -> None:
        """tree: a nested dict of numpy / jax arrays for one group, already in the checkpoint dtype."""
        if name not in group_names(self.cfg):
            raise CheckpointError(f"unknown parameter group {name!r}")
        compare_trees(get_group(self.expected, name), tree, f"group {name}")
        nbytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
        self._staging.check_space(nbytes, f"group {name}")
        save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=self.chunk_bytes), tree)
        self._ckptr.save(self.tmp / "params" / name, args=ocp.args.StandardSave(tree, save_args=save_args))
        release_freed_memory()
        self.files.update(checksums.record(self.tmp, f"params/{name}"))  # hashed while still in the page cache
        self.written.add(name)
        self.bytes += nbytes

    def add_file(self, src: str | os.PathLike, name: str) -> None:
        shutil.copyfile(src, self.tmp / name)
        self.files[name] = {"bytes": (self.tmp / name).stat().st_size, "sha256": checksums.hash_file(self.tmp / name)}

    def finish(self) -> Path:
        missing = [g for g in group_names(self.cfg) if g not in self.written]
        if missing:
            raise CheckpointError(f"checkpoint incomplete: groups never written: {missing}")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "dtype": self.dtype,
            "num_params": self.cfg.num_params,
            "bytes": self.bytes,
            "groups": group_names(self.cfg),
            "source": self.source,
            "has_tokenizer": (self.tmp / "tokenizer.json").exists(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if self.quantization:
            meta["quantization"] = self.quantization
        meta["checksums"] = checksums.section(self.files)
        (self.tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        return self._staging.commit()


def save_params(out, cfg: NeoXConfig, params, dtype=None, source=None, tokenizer_file=None, overwrite=False) -> Path:
    """Saves a whole in-memory params tree (unstacked layers) as a checkpoint."""
    leaf_dtype = jax.tree.leaves(params)[0].dtype if dtype is None else dtype
    with CheckpointWriter(
        out, cfg, leaf_dtype, source, overwrite=overwrite, quantization=quantize.describe(params)
    ) as w:
        for name in group_names(cfg):
            w.write_group(
                name, jax.tree.map(np.asarray, quantize.cast_floats(get_group(params, name), DTYPES[w.dtype]))
            )
        if tokenizer_file is not None:
            w.add_file(tokenizer_file, "tokenizer.json")
        return w.finish()


@dataclass(frozen=True)
class Stored:
    """A checkpoint directory whose metadata.json was read and checked once: what restore, verify and load need."""

    path: Path  # absolute: Orbax reads no metadata from a relative path
    meta: dict[str, Any]
    cfg: NeoXConfig

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def quant(self):
        return quantize.spec_from_metadata(self.meta.get("quantization"))


def open(path: str | os.PathLike | Stored) -> Stored:  # noqa: A001  checkpoint.open(path), as a file is opened
    """Reads and checks CKPT/metadata.json once (CheckpointError naming the file and field otherwise)."""
    if isinstance(path, Stored):
        return path
    path = Path(path).absolute()
    return Stored(path, *_read_metadata(path))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    return _read_metadata(Path(path))[0]


def _read_metadata(path: Path) -> tuple[dict[str, Any], NeoXConfig]:
    meta_file = path / "metadata.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path}: not a neox-jax checkpoint (no metadata.json; convert weights with "
            f"`neox-jax convert hf|neox SRC {path}` first)"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{meta_file}: cannot read ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_file}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return meta, _check_fields(meta_file, meta)


def _check_fields(meta_file: Path, meta: dict) -> NeoXConfig:
    """The fields readers rely on have the right types and agree with each other (CheckpointError naming the file)."""
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_file}: `config` is missing or not an object")
    try:
        cfg = NeoXConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: bad `config`: {e}") from None
    if meta.get("dtype") not in DTYPES:
        raise CheckpointError(f"{meta_file}: `dtype` is {meta.get('dtype')!r}, expected one of {list(DTYPES)}")
    groups = meta.get("groups")
    if groups is not None and groups != group_names(cfg):
        raise CheckpointError(
            f"{meta_file}: `groups` lists {len(groups) if isinstance(groups, list) else groups!r} "
            f"groups, but `config` (num_hidden_layers {cfg.num_hidden_layers}) has "
            f"{len(group_names(cfg))}"
        )
    try:
        quantize.spec_from_metadata(meta.get("quantization"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{meta_file}: bad `quantization`: {e!r}") from None
    cs = meta.get("checksums")
    if cs is not None and not (
        isinstance(cs, dict)
        and isinstance(cs.get("files"), dict)
        and all(
            isinstance(f, dict) and isinstance(f.get("bytes"), int) and isinstance(f.get("sha256"), str)
            for f in cs["files"].values()
        )
    ):
        raise CheckpointError(
            f"{meta_file}: bad `checksums` (expected {{'algorithm', 'files': {{path: {{'bytes', 'sha256'}}}}}})"
        )
    return cfg


def check_stored(ckpt: Stored) -> None:
    """What is stored agrees with metadata.json: exactly its groups (so a layer count that differs is caught) and,
    when recorded, every file present with its recorded size. Cheap (directory listings and stats, no hashing)."""
    path, meta, cfg = ckpt.path, ckpt.meta, ckpt.cfg
    want = group_names(cfg)
    params = path / "params"
    stored = {d.name for d in params.iterdir() if d.is_dir()} if params.is_dir() else set()
    missing, extra = [g for g in want if g not in stored], sorted(stored - set(want))
    if extra:
        layers = sum(g.startswith("layers.") for g in stored)
        raise CheckpointError(
            f"{params}: stores groups {extra} that {path / 'metadata.json'} does not have "
            f"({layers} layer groups stored, num_hidden_layers {cfg.num_hidden_layers} in metadata)"
        )
    if missing:
        raise CheckpointError(
            f"{params / missing[0]}: missing parameter group (incomplete checkpoint; "
            f"{len(missing)} of {len(want)} missing)"
        )
    if meta.get("checksums"):
        _raise_problems(path, checksums.problems(path, meta["checksums"], rehash=False))


def _raise_problems(path: Path, found: dict[str, list[str]]) -> None:
    if found:
        parts = [
            f"{g}: {'; '.join(msgs[:2])}{f' (+{len(msgs) - 2} more)' if len(msgs) > 2 else ''}"
            for g, msgs in found.items()
        ]
        raise ChecksumError(f"{path}: {len(found)} group(s) differ from the recorded checksums: {' | '.join(parts)}")


def verify(path: str | os.PathLike | Stored) -> int:
    """Re-hashes every stored file against metadata.json `checksums`; returns the bytes checked. ChecksumError names
    each group (parameter group, or top-level file) that differs."""
    if isinstance(path, Stored):
        path, meta = path.path, path.meta
    else:
        path = Path(path).absolute()
        meta = _finetuned_metadata(path) or read_metadata(path)
    if not meta.get("checksums"):
        raise CheckpointError(
            f"{path / 'metadata.json'}: no checksums recorded (written by an older neox-jax; "
            f"convert it again to add them)"
        )
    _raise_problems(path, checksums.problems(path, meta["checksums"], rehash=True))
    return checksums.total_bytes(meta["checksums"])


def _finetuned_metadata(path: Path) -> dict | None:
    """The metadata of a fine-tuning run's `finetuned/` folder (also verifiable), else None."""
    try:
        meta = json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == "neox-jax-finetuned" else None


def identity(path: str | os.PathLike) -> str:
    """A string that changes when the checkpoint's stored bytes do: the digest of its checksums, or for a checkpoint
    without them, of its metadata (config, dtype, source; not the creation time)."""
    meta = read_metadata(path)
    if meta.get("checksums"):
        return "sha256:" + checksums.digest(meta["checksums"])
    rest = {k: v for k, v in meta.items() if k != "created"}
    return "metadata-sha256:" + hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def read_config(path) -> NeoXConfig:
    return open(path).cfg


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def stored_tree(ckptr, directory: Path):
    """The tree of array metadata an Orbax item directory holds (CheckpointError if it has none readable)."""
    try:
        meta = ckptr.metadata(Path(directory).absolute()).item_metadata
    except Exception as e:  # noqa: BLE001  Orbax / TensorStore errors for missing or damaged files: name the directory
        raise CheckpointError(f"{directory}: cannot read Orbax metadata ({_first_line(e)})") from None
    if meta is None:
        raise CheckpointError(
            f"{directory}: no readable Orbax metadata (an incomplete write, or not an Orbax checkpoint directory)"
        )
    return meta.tree


def iter_groups(
    path: str | os.PathLike | Stored, dtype=None, shardings: Callable[[str], Any] | None = None
) -> Iterator[tuple[str, Any]]:
    """Yields (group name, nested dict of jax arrays) one group at a time, checked against the config.
    dtype: cast to this dtype (default: as stored). shardings(name) -> a tree of jax.sharding.Sharding for the group,
    so each device reads only its slice (cast to dtype as it is read)."""
    ckpt = open(path)
    check_stored(ckpt)
    path, cfg = ckpt.path, ckpt.cfg
    stored = DTYPES[ckpt.dtype]
    target = stored if dtype is None else DTYPES[dtype_name(dtype)]
    expected = abstract_params(cfg, stored, quant=ckpt.quant)
    ckptr = _checkpointer()
    for name in group_names(cfg):
        gdir = path / "params" / name
        if not gdir.is_dir():
            raise CheckpointError(f"{gdir}: missing parameter group (incomplete checkpoint)")
        want = get_group(expected, name)
        found = stored_tree(ckptr, gdir)
        compare_trees(want, found, str(gdir))
        shard_tree = shardings(name) if shardings is not None else None
        if shard_tree is None:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shard_tree = jax.tree.map(lambda _: dev, want)
        # cast while reading (no second copy); int8 kernels and their float32 scales stay as stored
        dtypes = quantize.cast_floats(jax.tree.map(lambda x: np.zeros((), x.dtype), want), target)
        abstract = jax.tree.map(
            lambda x, t, s: jax.ShapeDtypeStruct(x.shape, t.dtype, sharding=s), want, dtypes, shard_tree
        )
        try:
            tree = ckptr.restore(gdir, ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001  a deleted or damaged data file: one line naming the group, not Orbax's traceback
            raise CheckpointError(
                f"{gdir}: cannot read ({_first_line(e)}); `neox-jax convert verify {path}` checks every file"
            ) from None
        release_freed_memory()  # the reading threads' buffers for this group: back to the OS, not kept in arenas
        yield name, tree


def restore_params(path, dtype=None, shardings=None) -> dict:
    params: dict = {}
    for name, tree in iter_groups(path, dtype, shardings):
        set_group(params, name, tree)
    return params
