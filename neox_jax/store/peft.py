"""PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors) <-> neox-jax adapters.

PEFT names a GPT-NeoX adapter tensor `base_model.model.gpt_neox.layers.{i}.{attention|mlp}.{linear}.lora_{A|B}.weight`
with lora_A.weight [r, in] and lora_B.weight [out, r] in torch's [out, in] orientation over HF's flattened rows and
columns. Ours are lora_A [in dims..., r], lora_B [r, out dims...] (lora.py): HF's query_key_value rows are per-head
interleaved q, k, v, i.e. [N, 3, H] flattened, and its dense columns [N, H] flattened - the order of our kernel axes -
so each direction is a transpose and a reshape (as convert/mapping.py does for the weights themselves).

Supported: plain LoRA (`peft_type` LORA) on any of query_key_value, dense, dense_h_to_4h, dense_4h_to_h, with `r`,
`lora_alpha`, `use_rslora`, `lora_dropout` (training only), `target_modules` as a list, a regex or "all-linear" (the
tensors present decide what is adapted). Refused, by name: DoRA, bias != "none", lora_bias, modules_to_save,
layers_to_transform, rank_pattern / alpha_pattern, fan_in_fan_out, trainable tokens, layer replication, and any
tensor outside those four linears (embed_in, embed_out, ...).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import uuid
from pathlib import Path

import numpy as np

from neox_jax.errors import NeoXError
from neox_jax.model import lora

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
KEY = re.compile(r"^base_model\.model\.gpt_neox\.layers\.(\d+)\.(attention|mlp)\.(\w+)\.lora_(A|B)\.weight$")
# adapter_config.json fields that change what the adapter computes, and the values we can run
REFUSED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "fan_in_fan_out": (False, None),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None, []),
}


def peft_name(i: int, name: str, which: str) -> str:
    return f"base_model.model.gpt_neox.layers.{i}.{lora.PARENT[name]}.{name}.lora_{which}.weight"


def to_peft_tensors(adapters: dict) -> dict[str, np.ndarray]:
    """Our adapter tree -> {PEFT name: float32 array}: A [in..., r] -> [r, in]; B [r, out...] -> [out, r]."""
    out = {}
    for i, layer in adapters["layers"].items():
        for linears in layer.values():
            for name, ab in linears.items():
                a, b = np.asarray(ab["lora_A"], np.float32), np.asarray(ab["lora_B"], np.float32)
                r = a.shape[-1]
                out[peft_name(int(i), name, "A")] = np.ascontiguousarray(a.reshape(-1, r).T)
                out[peft_name(int(i), name, "B")] = np.ascontiguousarray(b.reshape(r, -1).T)
    return out


def from_peft_tensors(tensors: dict, cfg, rank: int, where: str) -> dict:
    """{PEFT name: array} -> our adapter tree (float32), checking every name and shape against cfg."""
    kernels = lora._kernels(cfg)
    found: dict = {}
    for key, x in tensors.items():
        m = KEY.match(key)
        if not m or m.group(3) not in lora.TARGETS or lora.PARENT[m.group(3)] != m.group(2):
            raise NeoXError(
                f"{where}: tensor {key}: not a LoRA weight of {', '.join(lora.TARGETS)} (adapters on "
                f"other modules, DoRA magnitudes and biases are not supported)"
            )
        i, name, which = int(m.group(1)), m.group(3), m.group(4)
        if i >= cfg.num_hidden_layers:
            raise NeoXError(f"{where}: tensor {key}: layer {i}, but the model has {cfg.num_hidden_layers} layers")
        a_shape, b_shape = lora.adapter_shapes(name, kernels[name][0], rank)
        n_in, n_out = int(np.prod(a_shape[:-1])), int(np.prod(b_shape[1:]))
        want = (rank, n_in) if which == "A" else (n_out, rank)
        if tuple(x.shape) != want:
            raise NeoXError(f"{where}: tensor {key}: expected shape {list(want)} (r={rank}), found {list(x.shape)}")
        x = np.asarray(x, np.float32).T  # [in, r] / [r, out]
        ours = x.reshape(a_shape) if which == "A" else x.reshape(b_shape)
        found.setdefault(i, {}).setdefault(lora.PARENT[name], {}).setdefault(name, {})[f"lora_{which}"] = ours
    for i, layer in found.items():
        for linears in layer.values():
            for name, ab in linears.items():
                if len(ab) != 2:
                    raise NeoXError(f"{where}: layer {i} {name}: has {next(iter(ab))} but not its pair")
    if not found:
        raise NeoXError(f"{where}: no LoRA tensors")
    return {"layers": dict(sorted(found.items()))}


def peft_config(spec: lora.LoraSpec, base_model: str | None = None) -> dict:
    """An adapter_config.json that peft.PeftModel.from_pretrained reads (peft >= 0.10)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": list(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
    }


def spec_from_config(conf: dict, targets: tuple[str, ...], where: str) -> lora.LoraSpec:
    if conf.get("peft_type") != "LORA":
        raise NeoXError(f"{where}: peft_type {conf.get('peft_type')!r}: only LORA adapters are supported")
    for key, ok in REFUSED.items():
        if key in conf and conf[key] not in ok:
            raise NeoXError(f"{where}: {key}={conf[key]!r} is not supported (supported: {ok[0]!r})")
    for key in ("r", "lora_alpha"):
        if not isinstance(conf.get(key), (int, float)):
            raise NeoXError(f"{where}: {key} missing or not a number ({conf.get(key)!r})")
    return lora.LoraSpec(
        int(conf["r"]),
        float(conf["lora_alpha"]),
        targets,
        float(conf.get("lora_dropout") or 0.0),
        bool(conf.get("use_rslora", False)),
    )


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy; bfloat16 through ml_dtypes (safetensors' numpy reader lacks it)."""
    import ml_dtypes

    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise NeoXError(f"{path}: tensor {key}: dtype {info['dtype']} (expected a float type)")
        start, end = info["data_offsets"]
        out[key] = np.frombuffer(
            raw, dtypes[info["dtype"]], (end - start) // np.dtype(dtypes[info["dtype"]]).itemsize, 8 + n + start
        ).reshape(info["shape"])
    return out


def read_adapter(directory, cfg) -> tuple[lora.LoraSpec, dict]:
    """(spec, float32 adapter tree) of a PEFT LoRA adapter directory, for the model config cfg."""
    d = Path(directory)
    conf_file, weights = d / CONFIG, d / WEIGHTS
    if not conf_file.is_file():
        raise NeoXError(f"{d}: no {CONFIG} (expected a PEFT LoRA adapter directory, made by save_pretrained)")
    if not weights.is_file():
        other = (
            " (found adapter_model.bin: re-save it with safe_serialization=True)"
            if (d / "adapter_model.bin").is_file()
            else ""
        )
        raise NeoXError(f"{d}: no {WEIGHTS}{other}")
    conf = json.loads(conf_file.read_text())
    r = conf.get("r")
    if not isinstance(r, int):
        raise NeoXError(f"{conf_file}: r missing or not an integer ({r!r})")
    spec_from_config(conf, lora.DEFAULT_TARGETS, str(conf_file))  # refusals before reading the weights
    adapters = from_peft_tensors(read_safetensors(weights), cfg, r, str(weights))
    names = {n for layer in adapters["layers"].values() for linears in layer.values() for n in linears}
    return spec_from_config(conf, tuple(t for t in lora.TARGETS if t in names), str(conf_file)), adapters


def write_adapter(out, spec: lora.LoraSpec, adapters: dict, base_model: str | None = None) -> Path:
    """Writes OUT/adapter_config.json + adapter_model.safetensors under a temporary name, renamed when complete."""
    from safetensors.numpy import save_file

    out = Path(out).absolute()
    if out.exists():
        raise NeoXError(f"{out} already exists; choose another output directory or remove it")
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        save_file(to_peft_tensors(adapters), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(peft_config(spec, base_model), indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
