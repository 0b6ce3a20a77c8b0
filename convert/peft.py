"""neox-jax convert to-peft CKPT RUN_DIR OUT: a LoRA fine-tuning run as a PEFT adapter directory.

Writes OUT/adapter_config.json and OUT/adapter_model.safetensors (float32, PEFT's tensor names) so that
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_DIR), OUT)` gives the logits of
`neox_jax.load(CKPT, finetuned=RUN_DIR)`, HF_DIR being CKPT exported with `convert to-hf` (or the model it came from).
"""

from __future__ import annotations

import time

from neox_jax.model import lora
from neox_jax.model.config import NeoXConfig
from neox_jax.store import peft as lora_peft
from neox_jax.store.checkpoint import read_metadata
from neox_jax.training.step import load_finetuned, mode_from_meta

from .sources import ConvertError


def to_peft(ckpt, run_dir, out) -> dict:
    t0 = time.time()
    meta = read_metadata(ckpt)
    cfg = NeoXConfig.from_dict(meta["config"])
    ft_meta, adapters = load_finetuned(run_dir)
    spec = mode_from_meta(ft_meta)
    if not lora.is_lora(spec):
        raise ConvertError(
            f"{run_dir}: trained {ft_meta['trainable']!r}, not LoRA; for a BitFit / full run use "
            f"`neox-jax convert merge` then `convert to-hf`"
        )
    if NeoXConfig.from_dict(ft_meta["config"]) != cfg:
        raise ConvertError(f"{run_dir} was fine-tuned for a different model config than {ckpt}")
    source = meta.get("source", {})
    base = source.get("repo_id") or source.get("path")  # where the base came from, for adapter_config.json
    path = lora_peft.write_adapter(out, spec, adapters, base)
    return {
        "out": str(path),
        "params": lora.count(cfg, spec),
        "bytes": lora.count(cfg, spec) * 4,
        "seconds": time.time() - t0,
        "dtype": "float32",
    }


def _run(a):
    return to_peft(a.ckpt, a.run_dir, a.out)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "to-peft", help="LoRA fine-tuning run -> PEFT adapter directory", description=__doc__.split("\n\n")[1]
    )
    p.add_argument("ckpt", help="the base neox-jax checkpoint the run fine-tuned")
    p.add_argument("run_dir", help="the LoRA fine-tuning run directory (finetune --trainable lora --out)")
    p.add_argument("out", help="output adapter directory (must not exist; appears only when complete)")
    p.set_defaults(convert=_run)
