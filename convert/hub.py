"""Conversion from a hub id + revision: resolve and verify the files (neox_jax.store.hub), then convert the local
snapshot
with convert/hf.py, recording where it came from; and the converted-checkpoint cache behind
`neox_jax.load("org/name", revision=...)`.

    $NEOX_JAX_CACHE/checkpoints/ORG--NAME/COMMIT-DTYPE/    one neox-jax checkpoint per (commit, dtype)

A cache entry appears only complete (CheckpointWriter writes a temporary directory and renames it), so a killed
conversion leaves nothing that looks done, and the next call converts again.
"""

from __future__ import annotations

from pathlib import Path

from neox_jax.store import hub
from neox_jax.store.checkpoint import CheckpointError, dtype_name

from .hf import convert_hf
from .sources import ConvertError


def convert_source(
    source, out, revision: str | None = None, dtype="float32", allow_nonfinite=False, progress=True
) -> dict:
    """SOURCE: a local save_pretrained directory, or a hub id `org/name` (downloaded, verified, then converted)."""
    if not hub.is_hub_id(source):
        if revision is not None:
            raise ConvertError(f"--revision {revision}: {source} is a local directory, not a hub id (org/name)")
        return convert_hf(source, out, dtype, allow_nonfinite=allow_nonfinite, progress=progress)
    if Path(out).exists():  # before downloading gigabytes
        raise CheckpointError(f"{Path(out).absolute()} already exists; choose another output directory or remove it")
    files = hub.fetch(str(source), revision)
    summary = convert_hf(
        files.path, out, dtype, allow_nonfinite=allow_nonfinite, progress=progress, hub=files.source_record()
    )
    return {**summary, "commit": files.resolved.commit}


def cache_entry(repo_id: str, commit: str, dtype) -> Path:
    return hub.neox_cache_dir() / "checkpoints" / repo_id.replace("/", "--") / f"{commit}-{dtype_name(dtype)}"


def cached_checkpoint(repo_id: str, revision: str | None = None, dtype="float32", progress=True) -> Path:
    """The converted checkpoint of repo_id@revision in dtype, converting it once (verified) when not cached yet."""
    s = hub.Settings.from_env()
    try:
        r = hub.resolve(repo_id, revision, s)
    except hub.HubError:
        commit = hub.recorded_commit(repo_id, revision or "main", s)  # offline, HF cache cleared, converted before
        if commit is not None and (cache_entry(repo_id, commit, dtype) / "metadata.json").is_file():
            return cache_entry(repo_id, commit, dtype)
        raise
    return checkpoint_for(r, dtype, progress, s)


def checkpoint_for(r: hub.Resolved, dtype="float32", progress=True, settings: hub.Settings | None = None) -> Path:
    """The cache entry of a resolved revision: downloaded, verified and converted on first use."""
    out = cache_entry(r.repo_id, r.commit, dtype)
    if (out / "metadata.json").is_file():
        return out
    files = hub.download(r, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        convert_hf(files.path, out, dtype, progress=progress, hub=files.source_record())
    except CheckpointError:
        if not (out / "metadata.json").is_file():  # not another process that finished the same entry first
            raise
    return out
