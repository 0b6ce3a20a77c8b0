"""Slim-shard conversion: peak memory stays flat as the model grows, and throughput in MB/s.

    neox-jax benchmark convert [--quick] [--hidden 2048] [--tp 2] [--layers 4 16]

Writes synthetic GPT-NeoX slim shards (random float16 weights in the published layout, hidden 2048, TP 2) with 4 and
with 16 layers, converts each with `convert.neox.convert_neox` in a fresh subprocess and reports that process's peak
RSS and the MB/s it read. The reference, also in a subprocess, is what merge scripts commonly do: torch.load every
shard file whole (no mmap) and keep it; its peak grows with the model. --quick: hidden 256, vocab 1024.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neox_jax.bench._common import child_env, markdown_table, require, run_json, write_json
from neox_jax.store import converters

# Peak RSS of the child's own address space: /proc/self/status VmHWM starts afresh at exec, while getrusage's
# ru_maxrss keeps the parent's high-water mark across fork + exec (this script's own RSS would leak into it).
PEAK = """
def peak_rss_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    from neox_jax.bench._common import peak_rss_mb as ru_maxrss_mb
    return ru_maxrss_mb()
"""

CHILD_CONVERT = (
    PEAK
    + """
import json, sys, time
from neox_jax.store import converters
convert_neox = converters.module("neox").convert_neox
base = peak_rss_mb()
s = convert_neox(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"seconds": s["seconds"], "source_bytes": s["source_bytes"], "mb_per_s": s["source_mb_per_s"],
                  "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": base, "tensor_parallel": s["tensor_parallel"]}))
"""
)

CHILD_LOAD_ALL = (
    PEAK
    + """
import json, sys, time
from pathlib import Path
import torch
base, t0 = peak_rss_mb(), time.time()
held = {p.name: torch.load(p, weights_only=True) for p in sorted(Path(sys.argv[1]).glob("global_step*/layer_*.pt"))}
size = sum(p.stat().st_size for p in Path(sys.argv[1]).glob("global_step*/layer_*.pt"))
print(json.dumps({"seconds": time.time() - t0, "source_bytes": size, "mb_per_s": size / 1e6 / (time.time() - t0),
                  "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": base}))
"""
)


def make_source(path: Path, hidden: int, layers: int, tp: int, vocab: int, seed: int = 0) -> None:
    """Synthetic slim shards, one tensor generated at a time (this process never holds the model)."""
    group_entries, write_slim = converters.module("mapping").group_entries, converters.module("neox_layout").write_slim
    from neox_jax.model.config import NeoXConfig
    from neox_jax.store.checkpoint import group_names

    cfg = NeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        intermediate_size=4 * hidden,
        hidden_act="gelu_fast",
    )
    shapes = {e.hf_name: e.hf_shape for g in group_names(cfg) for e in group_entries(cfg, g)}
    rng = np.random.default_rng(seed)

    def tensor(name):
        return (rng.standard_normal(shapes[name], dtype=np.float32) * 0.02).astype(np.float16)

    write_slim(path, cfg, tensor, tp)


def run_child(code: str, *args) -> dict:
    return run_json(
        [sys.executable, "-c", code, *map(str, args)],
        "child",
        env=child_env(JAX_PLATFORMS="cpu"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (hidden 256, vocab 4096) to check the script")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument(
        "--vocab",
        type=int,
        default=8192,
        help="vocab rows (default 8192, so the blocks, not the embedding, make the model grow)",
    )
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    p.add_argument("--workdir", default=None, help="where the synthetic shards and outputs go (default: a temp dir)")
    p.add_argument("--out", default="bench_out", help="directory for convert.json")
    a = p.parse_args()
    require(["torch"], "GPT-NeoX slim shards are torch files")
    if a.quick:
        a.hidden, a.vocab = 256, 1024
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    rows = []
    try:
        for layers in a.layers:
            src = work / f"slim_{layers}"
            t0 = time.time()
            make_source(src, a.hidden, layers, a.tp, a.vocab)
            print(f"wrote {layers}-layer synthetic shards in {time.time() - t0:.0f} s", file=sys.stderr)
            size_mb = sum(f.stat().st_size for f in src.glob("global_step*/layer_*.pt")) / 1e6
            for name, code, extra in (
                ("neox-jax convert (mmap, one layer)", CHILD_CONVERT, [work / f"ckpt_{layers}"]),
                ("reference: torch.load all shards", CHILD_LOAD_ALL, []),
            ):
                r = run_child(code, src, *extra)
                rows.append(
                    {
                        "method": name,
                        "layers": layers,
                        "hidden": a.hidden,
                        "tp": a.tp,
                        "shards_MB": round(size_mb, 1),
                        "peak_rss_MB": round(r["peak_rss_mb"]),
                        "rss_after_imports_MB": round(r["rss_after_imports_mb"]),
                        "MB_per_s": round(r["mb_per_s"], 1),
                        "seconds": round(r["seconds"], 2),
                    }
                )
                print(rows[-1], file=sys.stderr)
            shutil.rmtree(work / f"ckpt_{layers}", ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    conv = [r for r in rows if r["method"].startswith("neox-jax")]
    growth = conv[-1]["peak_rss_MB"] / conv[0]["peak_rss_MB"] if len(conv) > 1 else 1.0
    model_growth = conv[-1]["shards_MB"] / conv[0]["shards_MB"] if len(conv) > 1 else 1.0
    cols = ["method", "layers", "shards_MB", "peak_rss_MB", "rss_after_imports_MB", "MB_per_s", "seconds"]
    print(markdown_table(rows, cols))
    verdict = "flat (within 10%)" if growth <= 1.10 else "NOT flat"
    print(
        f"\nneox-jax peak RSS x{growth:.3f} while the shards grew x{model_growth:.2f}: {verdict}"
        + (" [--quick sizes]" if a.quick else "")
    )
    path = write_json(
        "convert",
        {
            "quick": a.quick,
            "rows": rows,
            "peak_rss_growth": growth,
            "shards_growth": model_growth,
            "machine": _machine(),
        },
        a.out,
    )
    print(f"wrote {path}")


def _machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"


if __name__ == "__main__":
    main()
