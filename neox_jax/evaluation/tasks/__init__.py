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


# datasets' packaged builders (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`): they read the files
# they are given, not a Hub dataset of that name (the list datasets 4.x ships, used when datasets cannot be imported)
PACKAGED_BUILDERS = ("arrow", "csv", "json", "pandas", "parquet", "text", "xml", "webdataset", "imagefolder")


def packaged_builders() -> set[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:
        return set(PACKAGED_BUILDERS)
    return set(_PACKAGED_DATASETS_MODULES)


def _paths(data_files) -> list[str]:
    """Every path in a datasets `data_files` value (a str, a list, or {split: str or list})."""
    if isinstance(data_files, dict):
        return [p for v in data_files.values() for p in _paths(v)]
    if isinstance(data_files, (list, tuple)):
        return [p for v in data_files for p in _paths(v)]
    return [str(data_files)]


def remote_dataset(cfg: dict) -> str | None:
    """The Hub dataset id a task config (an lm-eval YAML, parsed) downloads, or None when its data is local or this
    cannot tell (a custom loader, a packaged builder over local files or URLs, a local directory or script)."""
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or not path or cfg.get("custom_dataset") is not None:
        return None
    if path in packaged_builders() or Path(path).expanduser().exists():
        return None  # datasets reads the data_files / the directory it is given; lm-eval reports a missing file itself
    return path


def hub_dataset(name: str, task_manager) -> str | None:
    """The Hub dataset an lm-eval task reads (see remote_dataset), when the index knows the task; None otherwise."""
    entry = getattr(task_manager, "task_index", {}).get(name)
    cfg = getattr(entry, "cfg", None)
    return remote_dataset(cfg) if isinstance(cfg, dict) else None


def hub_cached(dataset: str) -> bool:
    """Whether the Hugging Face caches hold a copy of a Hub dataset: the Hub's file cache, or datasets' own prepared
    cache (either lets an offline run read it)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    if (Path(HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").is_dir():
        return True
    try:
        from datasets import config
    except ImportError:
        return False
    return (Path(config.HF_DATASETS_CACHE) / dataset.replace("/", "___")).is_dir()


def check_offline(specs: dict[str, str], data_dir=None, task_manager=None) -> None:
    """With HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, a task that can be shown to download its data (its YAML names
    a Hub dataset that is in neither Hugging Face cache) is named at once, not after lm-eval's retries. Anything this
    cannot tell (a group, a custom loader, local files, a task file) is left to lm-eval, which reads it or fails."""
    var = offline_var()
    if var is None:
        return
    remote = []
    for n, spec in specs.items():
        if spec != n or Path(n).expanduser().is_file():  # a task YAML by path, as lm-eval reads it
            continue
        dataset = hub_dataset(n, task_manager)
        if dataset is not None and not hub_cached(dataset):
            remote.append(n)
    if remote:
        where = ", ".join(str(p) for p in data.data_dirs(data_dir)) or "(no data directory)"
        local = [n for n in remote if n in LOCAL_TASKS]
        raise NeoXError(
            f"task(s) {', '.join(remote)} would download data from the Hugging Face Hub, but {var} is "
            f"set and the data is not in the Hugging Face cache"
            + (f"; local data for {', '.join(local)} was not found under {where} (--data-dir)" if local else "")
        )
