"""Local-data task overrides for lm-evaluation-harness (YAMLs beside data.py; no lm-eval import here).

`task_specs(["lambada_openai", "piqa", "mmlu"], data_dir)` gives, for each name, the path of this folder's YAML when
its data is found locally (data.py says where it looks), else the name itself, which lm-eval resolves to its built-in
(Hub) task. `TASKS_DIR` can also be given to lm-eval's `--include_path` to override the built-ins wholesale.
`check_data_dir` and `check_offline` fail before any work when a task would otherwise go to the network by mistake.
"""

from __future__ import annotations

import os
from pathlib import Path

from neox_jax.errors import NeoXError
from neox_jax.evaluation.tasks import data

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

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


def check_data_dir(data_dir) -> None:
    """Every folder named in --data-dir must exist: a typo would otherwise send the tasks to the Hub unnoticed."""
    for p in str(data_dir or "").split(os.pathsep):
        if p and not Path(p).expanduser().is_dir():
            raise NeoXError(f"--data-dir {p}: no such directory")


def offline_var() -> str | None:
    """The Hugging Face offline variable that is set (to 1 / true / yes / on), or None."""
    return next((v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")), None)


def hub_dataset(name: str, task_manager) -> str | None:
    """The Hub dataset an lm-eval built-in task reads (its YAML's dataset_path), when the index knows it."""
    entry = getattr(task_manager, "task_index", {}).get(name)
    cfg = getattr(entry, "cfg", None) or {}
    return cfg.get("dataset_path") if isinstance(cfg.get("dataset_path"), str) else None


def hub_cached(dataset: str | None) -> bool:
    """Whether the Hugging Face cache holds a copy of a Hub dataset (so an offline run can read it)."""
    if not dataset or os.path.isdir(dataset):
        return bool(dataset)
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").is_dir()


def check_offline(specs: dict[str, str], data_dir=None, task_manager=None) -> None:
    """With HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, a task that would download its data (a built-in task whose
    data is neither local nor in the Hugging Face cache) is named at once, not after lm-eval's retries."""
    var = offline_var()
    if var is None:
        return
    remote = [
        n
        for n, spec in specs.items()
        if spec == n and not Path(n).is_file() and not hub_cached(hub_dataset(n, task_manager))
    ]
    if remote:
        where = ", ".join(str(p) for p in data.data_dirs(data_dir)) or "(no data directory)"
        local = [n for n in remote if n in LOCAL_TASKS]
        raise NeoXError(
            f"task(s) {', '.join(remote)} would download data from the Hugging Face Hub, but {var} is "
            f"set and the data is not in the Hugging Face cache"
            + (f"; local data for {', '.join(local)} was not found under {where} (--data-dir)" if local else "")
        )
