"""Local-data task overrides for lm-evaluation-harness (YAMLs beside data.py; no lm-eval import here).

`task_specs(["lambada_openai", "piqa", "mmlu"], data_dir)` gives, for each name, the path of this folder's YAML when
its data is found locally (data.py says where it looks), else the name itself, which lm-eval resolves to its built-in
(Hub) task. `TASKS_DIR` can also be given to lm-eval's `--include_path` to override the built-ins wholesale.
"""
from __future__ import annotations

from pathlib import Path

from neox_jax.tasks import data

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))


def local_yaml(name: str) -> Path:
    return TASKS_DIR / f"{name}.yaml"


def task_specs(names, data_dir=None, hub: bool = False) -> dict[str, str]:
    """name -> what to hand lm-eval: a local YAML path (data found) or the name (built-in task)."""
    out = {}
    for name in names:
        local = not hub and name in LOCAL_TASKS and data.find(name, data_dir) is not None
        out[name] = str(local_yaml(name)) if local else name
    return out
