"""Meshes and the one logical-axis -> mesh-axis rules table (Megatron-style tensor parallel x data parallel).

Modules name their parameter axes (`embed`, `heads`, `mlp`, `vocab`, ...; see model.py); only this file knows the mesh
axes `data` and `model`. qkv and dense_h_to_4h are split over heads / mlp on `model` (column parallel), dense and
dense_4h_to_h over their input dim (row parallel), embed_in and embed_out over the vocabulary, the batch over `data`.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from neox_jax.config import NeoXConfig
from neox_jax.model import logical_axes
from neox_jax.quantize import spec_of

MESH_AXES = ("data", "model")

# logical axis -> mesh axis (None: replicated)
RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "heads": "model",
    "mlp": "model",
    "embed": None,
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


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = (sizes["data"], sizes["model"])
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def spec_for(axes: tuple[str, ...], mesh: Mesh | None = None) -> P:
    names = []
    for a in axes:
        mesh_axis = RULES[a]
        if mesh is not None and mesh_axis is not None and mesh.shape[mesh_axis] == 1:
            mesh_axis = None
        names.append(mesh_axis)
    return P(*names)


def check_divisible(cfg: NeoXConfig, mesh: Mesh, batch: int | None = None) -> None:
    """A clear error, with the sizes that would work, when the model or batch cannot be split over the mesh."""
    m, d = mesh.shape["model"], mesh.shape["data"]
    sizes = {"num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
             "vocab_size": cfg.vocab_size}
    bad = {k: v for k, v in sizes.items() if v % m}
    if bad:
        ok = [k for k in range(1, max(sizes.values()) + 1) if all(v % k == 0 for v in sizes.values())]
        ok = [k for k in ok if k <= len(jax.devices())] or ok[:8]
        raise ValueError(f"cannot split the model over model={m}: {', '.join(f'{k}={v}' for k, v in bad.items())} "
                         f"not divisible by {m}; model axis sizes that work: {ok}")
    if batch is not None and batch % d:
        ok = [k for k in range(d, batch * d + 1, d) if k % d == 0][:4]
        raise ValueError(f"batch size {batch} is not divisible by the mesh's data={d}; use a multiple of {d}, "
                         f"e.g. {ok}")


def param_specs(cfg: NeoXConfig, mesh: Mesh | None = None, stacked: bool = False, quant=None):
    """Tree of PartitionSpec matching the params tree. quant (quantize.spec_of(params)): int8 kernels keep the
    kernel's axes, their scales get the kernel's output axes."""
    return jax.tree.map(lambda axes: spec_for(axes, mesh), logical_axes(cfg, stacked, quant),
                        is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(cfg: NeoXConfig, mesh: Mesh, stacked: bool = False, quant=None):
    check_divisible(cfg, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh, stacked, quant),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params, cfg: NeoXConfig, mesh: Mesh):
    stacked = 0 not in params["layers"]
    return jax.device_put(params, param_shardings(cfg, mesh, stacked, spec_of(params)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """[B, ...] arrays split over `data`."""
    return NamedSharding(mesh, P("data" if mesh.shape["data"] > 1 else None, *([None] * (ndim - 1))))
