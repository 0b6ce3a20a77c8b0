"""Meshes and the one logical-axis -> mesh-axis rules table (Megatron-style tensor parallel x data parallel x FSDP).

Modules name their parameter axes (`embed`, `heads`, `mlp`, `vocab`, ...; see model.py); only this file knows the mesh
axes `data`, `fsdp` and `model`. qkv and dense_h_to_4h are split over heads / mlp on `model` (column parallel), dense
and dense_4h_to_h over their input dim (row parallel), embed_in and embed_out over the vocabulary, the batch over
`data` and `fsdp`. `fsdp` (only in meshes that name it: `--mesh fsdp=4,model=2`) is data parallel that also splits every
weight's `embed` (hidden) axis, ZeRO-3 style: parameters, their gradients and optimizer moments each live on one
fsdp shard, and XLA gathers a weight where a layer uses it (per layer under the stacked scan of --remat).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from neox_jax.inference.cache import cache_shape
from neox_jax.model.config import NeoXConfig
from neox_jax.model.int8 import spec_of
from neox_jax.model.neox import abstract_params, logical_axes

MESH_AXES = ("data", "fsdp", "model")  # a mesh has data and model; fsdp only when the spec names it

# logical axis -> mesh axis or axes (None: replicated); axes a mesh lacks or has at size 1 are left out
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "model",
    "heads": "model",
    "mlp": "model",
    "embed": "fsdp",
    "qkv": None,
    "head_dim": None,
    "norm": None,
    "layers": None,
    "length": None,
}


def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    """'data=2,model=4' -> {'data': 2, 'model': 4}. None / '' -> every device on `model` (inference default).
    One size may be -1 (the rest of the devices)."""
    if not spec:
        return {"data": 1, "model": num_devices}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, _, value = part.strip().partition("=")
        if name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"bad mesh spec {spec!r}: expected e.g. 'data=2,model=4' with axes {MESH_AXES}")
        sizes[name] = int(value)
    sizes.setdefault("data", 1)
    sizes.setdefault("model", 1)
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"bad mesh spec {spec!r}: at most one axis may be -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    for k, v in sizes.items():
        if v == -1:
            sizes[k] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {spec!r} needs {math.prod(sizes.values())} devices, but {num_devices} are available")
    return sizes


def _axes_of(sizes: dict[str, int]) -> tuple[str, ...]:
    return tuple(a for a in MESH_AXES if a in sizes)


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    axes = _axes_of(sizes)
    shape = tuple(sizes[a] for a in axes)
    return Mesh(np.asarray(devices).reshape(shape), axes, axis_types=(AxisType.Auto,) * len(axes))


def _mesh_axes(mesh_axis, mesh) -> str | tuple[str, ...] | None:
    """RULES' mesh axis (or axes) as far as `mesh` has them at a size above 1 (without a mesh: data and model)."""
    names = (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis or ())
    sizes = {"data": 2, "model": 2} if mesh is None else dict(mesh.shape)
    if mesh is None:
        names = tuple(a for a in names if a in sizes)
    else:
        names = tuple(a for a in names if sizes.get(a, 1) > 1)
    return None if not names else names[0] if len(names) == 1 else names


def spec_for(axes: tuple[str, ...], mesh: Mesh | None = None) -> P:
    """Logical axes -> PartitionSpec by RULES; mesh axes the mesh lacks or has at size 1 are left out
    (replicated)."""
    return P(*(_mesh_axes(RULES[a], mesh) for a in axes))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def data_size(mesh) -> int:
    """How many ways the batch splits: the mesh's `data` x `fsdp` axes (1 without a mesh)."""
    return 1 if mesh is None else dict(mesh.shape)["data"] * dict(mesh.shape).get("fsdp", 1)


def fsdp_size(mesh) -> int:
    return 1 if mesh is None else dict(mesh.shape).get("fsdp", 1)


def check_divisible(cfg: NeoXConfig, mesh, batch: int | None = None) -> None:
    """A clear error, with the sizes that would work, when the model or batch cannot be split over the mesh
    (a Mesh or AbstractMesh)."""
    m, d = mesh.shape["model"], data_size(mesh)
    n_dev = m * d
    sizes = {
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
    }
    bad = {k: v for k, v in sizes.items() if v % m}
    f = fsdp_size(mesh)
    if cfg.hidden_size % f:
        raise ValueError(
            f"cannot shard the weights over fsdp={f}: hidden_size={cfg.hidden_size} is not divisible by {f}; "
            f"fsdp sizes that work: {[k for k in _divisors(n_dev) if cfg.hidden_size % k == 0]}"
        )
    if bad:
        ok = [k for k in _divisors(n_dev) if all(v % k == 0 for v in sizes.values())]
        raise ValueError(
            f"cannot split the model over model={m}: {', '.join(f'{k}={v}' for k, v in bad.items())} "
            f"not divisible by {m}; model axis sizes that work on {n_dev} devices: {ok} "
            f"(e.g. --mesh data={n_dev // ok[-1]},model={ok[-1]})"
        )
    if batch is not None and batch % d:
        axes = "data x fsdp" if fsdp_size(mesh) > 1 else "data"
        up = -(-batch // d) * d
        multiples = sorted({k for k in (up - d, up, up + d) if k > 0})
        data_ok = [k for k in _divisors(n_dev) if batch % k == 0]
        raise ValueError(
            f"batch size {batch} is not divisible by the mesh's {axes}={d}: use a batch that is a "
            f"multiple of {d} (e.g. {multiples}) or a mesh with data in {data_ok}"
        )


def param_specs(cfg: NeoXConfig, mesh: Mesh | None = None, stacked: bool = False, quant=None):
    """Tree of PartitionSpec matching the params tree. quant (quantize.spec_of(params)): int8 kernels keep the
    kernel's axes, their scales get the kernel's output axes."""
    return jax.tree.map(
        lambda axes: spec_for(axes, mesh), logical_axes(cfg, stacked, quant), is_leaf=lambda x: isinstance(x, tuple)
    )


def param_shardings(cfg: NeoXConfig, mesh, stacked: bool = False, quant=None):
    """Tree of NamedSharding matching the params tree; a clear error when the model cannot be split over `mesh`."""
    check_divisible(cfg, mesh)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh, stacked, quant), is_leaf=lambda x: isinstance(x, P)
    )


def shard_params(params, cfg: NeoXConfig, mesh: Mesh):
    stacked = 0 not in params["layers"]
    return jax.device_put(params, param_shardings(cfg, mesh, stacked, spec_of(params)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """[B, ...] arrays split over `data` (and `fsdp`)."""
    return NamedSharding(mesh, P(_mesh_axes(RULES["batch"], mesh), *([None] * (ndim - 1))))


def put_batch(x, mesh: Mesh) -> jax.Array:
    """A host array [B, ...], the same on every process, -> a global jax.Array split over `data` (works multi-host)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) jax.Array -> the whole array as numpy on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---- the KV cache: [B, N, S, H] per layer, split over batch (data) and heads (model) -------------------------------

CACHE_AXES = ("batch", "heads", "length", "head_dim")  # [B, N, S, H] (heads before slots: see model.Attention)


def cache_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Sharding of one KV-cache buffer [B, N, S, H] (stacked: [L, B, N, S, H])."""
    axes = (("layers",) if stacked else ()) + CACHE_AXES
    return NamedSharding(mesh, spec_for(axes, mesh))


def constrain_state(state: dict, mesh: Mesh | None) -> dict:
    """Inside jit: pins a generation state on the mesh. The KV cache {"k", "v"} over batch (data) and heads (model),
    every other [B, ...] array over batch; scalars and PRNG keys stay as they are. No-op without a mesh."""
    if mesh is None:
        return state

    def pin(path, x):
        if x.ndim == 0 or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x
        if getattr(path[0], "key", None) == "cache":
            return jax.lax.with_sharding_constraint(x, cache_sharding(mesh, stacked=x.ndim == 5))
        return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))

    return jax.tree_util.tree_map_with_path(pin, state)


def put_replicated(x, mesh: Mesh) -> jax.Array:
    """A host array, the same on every process -> a global jax.Array replicated on every device of the mesh."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


# ---- memory per device, from shapes alone (no devices needed) ------------------------------------------------------


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """A device-free mesh of the given sizes ({'data': d, 'model': m}, optionally 'fsdp': f) for planning."""
    sizes = {"data": 1, "model": 1, **sizes}
    axes = _axes_of(sizes)
    return AbstractMesh(tuple(sizes[a] for a in axes), axes, axis_types=(AxisType.Auto,) * len(axes))


@functools.lru_cache(maxsize=8)
def _shapes_and_axes(cfg: NeoXConfig) -> tuple[tuple[tuple[int, ...], tuple[str, ...]], ...]:
    """(shape, logical axes) of every parameter, in tree order (two eval_shapes, cached: 20B takes seconds)."""
    shapes = [x.shape for x in jax.tree.leaves(abstract_params(cfg))]
    axes = jax.tree.leaves(logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return tuple(zip(shapes, axes))


def param_bytes_per_device(cfg: NeoXConfig, mesh, dtype=jnp.float16, weight_bytes: float | None = None) -> float:
    """Bytes of parameters each device holds when the params are placed by the rules on `mesh` (a Mesh or
    AbstractMesh), from jax.eval_shape (nothing allocated). weight_bytes overrides the bytes per element of the
    matrices (>= 2-D: kernels, embeddings; e.g. 1 for int8 weights); vectors keep `dtype`."""
    check_divisible(cfg, mesh)
    total = 0.0
    for shape, axes in _shapes_and_axes(cfg):
        size = weight_bytes if weight_bytes is not None and len(shape) >= 2 else jnp.dtype(dtype).itemsize
        total += math.prod(NamedSharding(mesh, spec_for(axes, mesh)).shard_shape(shape)) * size
    return total


def kv_cache_bytes_per_device(cfg: NeoXConfig, mesh, batch: int, length: int, dtype=jnp.float16) -> float:
    """Bytes of the K and V caches of every layer each device holds (batch split over data, heads over model; the
    length is never split, so it need not divide anything)."""
    check_divisible(cfg, mesh, batch)
    shard = cache_sharding(mesh).shard_shape(cache_shape(cfg, batch, length))  # [B/d, N/m, S, H]
    return 2 * cfg.num_hidden_layers * math.prod(shard) * jnp.dtype(dtype).itemsize
