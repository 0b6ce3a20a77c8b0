"""Host memory when restoring a checkpoint onto an 8-device mesh (model=8), against the model's size.

Writes a synthetic float32 checkpoint (random weights, a few hundred MB; --quick: a few MB) twice, with neox-jax's
chunked arrays (checkpoint.CHUNK_BYTES) and with one chunk per array, then measures each way of loading in a fresh
process:

  mesh          neox_jax.load(ckpt, mesh=...): each device reads its own slice (Orbax / TensorStore)
  mesh-1chunk   the same on the checkpoint stored with one chunk per array
  host+shard    the naive way: restore everything onto one device, then device_put onto the mesh

On CPU the 8 "devices" live in host memory, so the bytes that end up on them are in the RSS too. The number that
matters (the one a GPU host would see) is the excess: peak RSS - RSS before loading - bytes on the devices after.
glibc keeps freed buffers of its many thread arenas, which adds up over the groups; the "malloc" column says whether
the run used glibc's defaults or MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=0 MALLOC_MMAP_THRESHOLD_=1048576 (freed
memory goes back to the system: what is left is what the restore really holds at once).
No PyTorch reference here: there is no sharded restore to compare against.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neox_jax.bench._common import child_env, markdown_table, module_cmd, write_json

MB = 2**20
MALLOC_TRIM = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "1048576"}


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM (peak RSS) of this process from /proc (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def bench_config(quick: bool):
    from neox_jax.model.config import NeoXConfig

    if quick:  # ~6 MB
        return NeoXConfig(
            vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=8, intermediate_size=1024
        )
    # ~700 MB float32: per layer 192 MiB (qkv 48 MiB, mlp kernels 64 MiB each), embeddings 64 MiB each
    return NeoXConfig(
        vocab_size=8192, hidden_size=2048, num_hidden_layers=3, num_attention_heads=16, intermediate_size=8192
    )


def write_checkpoints(cfg, root: Path, warmup_cfg) -> dict[str, Path]:
    import jax
    import numpy as np

    from neox_jax.model.neox import init_params
    from neox_jax.store import checkpoint

    params = jax.tree.map(np.asarray, init_params(cfg))
    out = {}
    for name, chunk in (("chunked", checkpoint.CHUNK_BYTES), ("1chunk", None)):
        with checkpoint.CheckpointWriter(root / name, cfg, "float32", chunk_bytes=chunk) as w:
            for g in checkpoint.group_names(cfg):
                w.write_group(g, checkpoint.get_group(params, g))
            out[name] = w.finish()
    checkpoint.save_params(root / "warmup", warmup_cfg, init_params(warmup_cfg))
    out["warmup"] = root / "warmup"
    return out


def measure(mode: str, ckpt: str, warmup: str) -> dict:
    """Runs in a fresh process with 8 CPU devices. Loads a tiny checkpoint the same way first (Orbax, TensorStore and
    XLA set up their pools and caches once), then resets the peak RSS and measures the real load."""
    import jax

    import neox_jax
    from neox_jax.parallel import sharding
    from neox_jax.store import checkpoint

    mesh = sharding.make_mesh("model=8")

    def load(path):
        if mode == "host+shard":
            params = sharding.shard_params(checkpoint.restore_params(path), checkpoint.read_config(path), mesh)
        else:
            params = neox_jax.load(path, mesh=mesh).params
        return jax.block_until_ready(params)

    del_me = load(warmup)
    del del_me
    reset_peak_rss()
    before = _status_mb("VmRSS")
    t = time.perf_counter()
    params = load(ckpt)
    seconds = time.perf_counter() - t
    on_devices = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards) / MB
    peak = _status_mb("VmHWM")
    return {
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "on_devices_mb": on_devices,
        "excess_mb": peak - before - on_devices,
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a ~6 MB model: checks the benchmark runs")
    p.add_argument("--out-dir", default="bench_out", help="where restore.json goes (default bench_out)")
    p.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default: a temporary dir)")
    # the child process that measures one load
    p.add_argument("--measure", nargs=3, metavar=("MODE", "CKPT", "WARMUP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    import jax
    import jax.numpy as jnp

    from neox_jax.model.neox import abstract_params

    cfg = bench_config(args.quick)
    sizes = [x.size * 4 for x in jax.tree.leaves(abstract_params(cfg, jnp.float32))]
    model_mb, largest_mb = sum(sizes) / MB, max(sizes) / MB
    layer_mb = (sum(sizes) - 2 * cfg.vocab_size * cfg.hidden_size * 4) / cfg.num_hidden_layers / MB
    work = Path(args.workdir or tempfile.mkdtemp(prefix="neox-restore-"))
    try:
        print(f"writing synthetic checkpoints ({model_mb:.0f} MB float32 each) under {work} ...", flush=True)
        ckpts = write_checkpoints(cfg, work, bench_config(quick=True).replace(vocab_size=512, hidden_size=128))
        env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        rows = []
        for mode, ckpt, malloc in (
            ("mesh", "chunked", "default"),
            ("mesh", "chunked", "trim"),
            ("mesh-1chunk", "1chunk", "trim"),
            ("host+shard", "chunked", "trim"),
        ):
            run_env = {**env, **(MALLOC_TRIM if malloc == "trim" else {})}
            r = subprocess.run(
                module_cmd("restore", "--measure", mode, ckpts[ckpt], ckpts["warmup"]),
                env=run_env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if r.returncode:
                sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
            row = {"mode": mode, "malloc": malloc, **json.loads(r.stdout.strip().splitlines()[-1])}
            row["excess / model"] = row["excess_mb"] / model_mb
            row["excess / largest array"] = row["excess_mb"] / largest_mb
            rows.append(row)
            print(f"  {mode} (malloc {malloc}): excess {row['excess_mb']:.0f} MB", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    cols = [
        "mode",
        "malloc",
        "rss_before_mb",
        "peak_rss_mb",
        "on_devices_mb",
        "excess_mb",
        "excess / model",
        "excess / largest array",
        "seconds",
    ]
    print(
        f"\nmodel {model_mb:.0f} MB float32, one layer {layer_mb:.0f} MB, largest array {largest_mb:.0f} MB, "
        f"mesh model=8 on CPU; excess = peak RSS - RSS before - bytes on the devices (after a warm-up load)\n"
    )
    print(markdown_table(rows, cols))
    out = write_json(
        "restore",
        {"model_mb": model_mb, "largest_array_mb": largest_mb, "layer_mb": layer_mb, "quick": args.quick, "rows": rows},
        args.out_dir,
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
