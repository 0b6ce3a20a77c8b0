"""LoRA (Hu et al. 2021) on the block linears, laid out so PEFT adapters load here and ours load in PEFT.

A targeted Linear with kernel W [in dims..., out dims...] gets two float32 matrices, kept in the kernel's own axes:

    lora_A [in dims..., r]     query_key_value [D, r], dense [N, H, r], dense_h_to_4h [D, r], dense_4h_to_h [F, r]
    lora_B [r, out dims...]    query_key_value [r, N, 3, H], dense [r, D], dense_h_to_4h [r, F], dense_4h_to_h [r, D]

    y = x @ W + bias + scale * (dropout(x) @ A) @ B,    scale = alpha / r   (rsLoRA: alpha / sqrt(r))

computed unmerged inside the Linear (model.Linear.lora), in float32 whatever the base dtype, as PEFT does
(it casts x to the adapter's dtype). A shares the kernel's input axes and B its output axes, so both shard with the
matrix they adapt (B of query_key_value over heads, A of dense over heads, ...); the rank axis is replicated.
PEFT stores lora_A.weight [r, in] and lora_B.weight [out, r] over HF's rows, which for query_key_value are per-head
interleaved [N, 3, H] - the order of our kernel's output axes - so a transpose and a reshape convert either way
(lora_peft.py).

Initialisation as PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (torch's kaiming_uniform_(a=sqrt(5)) on an
[r, in] weight), B = 0, so training starts from the base model's outputs. Default targets: PEFT's for GPT-NeoX,
query_key_value.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.errors import NeoXError
from neox_jax.model.neox import LoraAdapter

F32 = jnp.float32
TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
DEFAULT_TARGETS = ("query_key_value",)  # peft.utils.constants: TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
PARENT = {"query_key_value": "attention", "dense": "attention", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"}
N_IN = {"query_key_value": 1, "dense": 2, "dense_h_to_4h": 1, "dense_4h_to_h": 1}  # contracted kernel dims


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What is adapted and how (hashable: the jitted step closes over it)."""

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise NeoXError(f"--lora-targets {','.join(self.targets)}: expected distinct names from {TARGETS}")
        if self.rank < 1:
            raise NeoXError(f"--lora-rank {self.rank}: must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise NeoXError(f"--lora-dropout {self.dropout}: must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        return cls(**{**d, "targets": tuple(d["targets"])})


def is_lora(mode) -> bool:
    """finetune's `mode`: "biases", "all", or a LoraSpec."""
    return isinstance(mode, LoraSpec)


Adapter = LoraAdapter  # the product itself lives beside Linear, which calls it


# ---- the adapter tree: {"layers": {i: {"attention": {"query_key_value": {"lora_A", "lora_B"}}, ...}}} -------------


def _kernels(cfg):
    """(layer path, kernel shape, kernel logical axes) of every targetable Linear of layer 0 (the same in each)."""
    from neox_jax.model.neox import abstract_params, logical_axes

    shapes, axes = abstract_params(cfg)["layers"][0], logical_axes(cfg)["layers"][0]
    return {name: (shapes[PARENT[name]][name]["kernel"].shape, axes[PARENT[name]][name]["kernel"]) for name in TARGETS}


def _map(cfg, spec: LoraSpec, fn) -> dict:
    """{"layers": {i: {parent: {name: fn(name, i, kernel shape, axes)}}}} over the spec's targets."""
    kernels = _kernels(cfg)
    layers = {}
    for i in range(cfg.num_hidden_layers):
        layer: dict = {}
        for name in spec.targets:
            layer.setdefault(PARENT[name], {})[name] = fn(name, i, *kernels[name])
        layers[i] = layer
    return {"layers": layers}


def adapter_shapes(name: str, kernel_shape, rank: int) -> tuple[tuple, tuple]:
    n = N_IN[name]
    return (*kernel_shape[:n], rank), (rank, *kernel_shape[n:])


def abstract_adapters(cfg, spec: LoraSpec) -> dict:
    def fn(name, i, shape, axes):
        a, b = adapter_shapes(name, shape, spec.rank)
        return {"lora_A": jax.ShapeDtypeStruct(a, F32), "lora_B": jax.ShapeDtypeStruct(b, F32)}

    return _map(cfg, spec, fn)


def adapter_shardings(cfg, spec: LoraSpec, mesh) -> dict:
    """A over the kernel's input axes, B over its output axes (sharding.RULES); the rank axis replicated."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from neox_jax.parallel.sharding import spec_for

    def fn(name, i, shape, axes):
        n = N_IN[name]
        return {
            "lora_A": NamedSharding(mesh, P(*spec_for(axes[:n], mesh), None)),
            "lora_B": NamedSharding(mesh, P(None, *spec_for(axes[n:], mesh))),
        }

    return _map(cfg, spec, fn)


def init_adapters(cfg, spec: LoraSpec, seed: int = 0, shardings=None) -> dict:
    """PEFT's initialisation: A uniform in +-1/sqrt(fan_in), B zero (float32), placed on `shardings`."""
    abstract = abstract_adapters(cfg, spec)

    def init():
        leaves, treedef = jax.tree.flatten(abstract)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        out = []
        for k, (path, x) in zip(keys, jax.tree_util.tree_flatten_with_path(abstract)[0], strict=True):
            if path[-1].key == "lora_B":
                out.append(jnp.zeros(x.shape, F32))
            else:
                bound = 1.0 / math.sqrt(math.prod(x.shape[:-1]))
                out.append(jax.random.uniform(k, x.shape, F32, -bound, bound))
        return jax.tree.unflatten(treedef, out)

    return jax.jit(init, out_shardings=shardings)()


def count(cfg, spec: LoraSpec) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_adapters(cfg, spec)))


def training_bytes(cfg, spec: LoraSpec) -> dict:
    """Bytes LoRA training adds to the frozen base: float32 adapters, their gradients and AdamW's two moments."""
    n = count(cfg, spec)
    return {"params": n, "adapters": 4 * n, "grads": 4 * n, "optimizer": 8 * n, "total": 16 * n}


# ---- folding adapters into the weights --------------------------------------------------------------------------


def delta(a, b, scale: float):
    """scale * A @ B as a kernel [in dims..., out dims...] in float32 (numpy or jax, as given)."""
    xp = np if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else jnp
    r = a.shape[-1]
    d = xp.asarray(a, dtype=np.float32).reshape(-1, r) @ xp.asarray(b, dtype=np.float32).reshape(r, -1)
    return (d * np.float32(scale)).reshape(*a.shape[:-1], *b.shape[1:])


def merge_layer(layer: dict, adapters: dict, scale: float) -> dict:
    """One layer's params with W + scale * A @ B in each adapted kernel, added in float32 and cast back to the kernel's
    dtype (and, for jax arrays, kept on its sharding)."""
    out = {k: dict(v) for k, v in layer.items()}
    for parent, linears in adapters.items():
        for name, ab in linears.items():
            lin = out[parent][name] = dict(out[parent][name])
            w = lin["kernel"]
            if "scale" in lin:
                raise NeoXError(
                    f"{parent}.{name}: LoRA cannot be folded into int8 weights; load the adapter first, then quantize"
                )
            d = delta(ab["lora_A"], ab["lora_B"], scale)
            if isinstance(w, np.ndarray):
                lin["kernel"] = (w.astype(np.float32) + np.asarray(d)).astype(w.dtype)
            else:
                lin["kernel"] = (w.astype(F32) + jax.device_put(d, w.sharding)).astype(w.dtype)
    return out


def merge_adapters(params: dict, adapters: dict, scale: float) -> dict:
    """params (unrolled layers) with every adapter folded into its kernel; the other leaves shared."""
    layers = dict(params["layers"])
    for i, ad in adapters["layers"].items():
        layers[i] = merge_layer(layers[i], ad, scale)
    return {**params, "layers": layers}
