"""Skinny matmuls, the products decode runs: for each of a model's weight shapes and each row count (the batch), every
way of writing the product under every XLA CPU flag set, against the memory floor, in one run.

    neox-jax benchmark matmul                         # pythia-70m shapes, rows 1, 2, 4, 8, 16, 32
    neox-jax benchmark matmul --preset pythia-160m --rows 1,16
    neox-jax benchmark matmul --quick                 # tiny shapes, two flag sets: checks that it runs

Forms (x [B, I] float32 activations; the weight in the layout the form reads):
- `x @ W`: W [I, O], the layout the checkpoint stores.
- `W x^T kept`: W [O, I] (PyTorch's layout), the product computed as W @ x^T into an [O, B] buffer kept in memory,
  then transposed. neox-jax's decode layout (model.neox.Linear with `transposed`, up to FEW_ROWS rows).
- `W x^T folded`: the same without keeping the [O, B] buffer (XLA folds the transpose into the product's layout).
- `x W^T`: einsum over W [O, I], the [B, O] result direct.
- `x @ W, 4 column blocks`: W [I, O] as four [I, O / 4] products, concatenated.

Flag sets: each runs in its own process (XLA reads XLA_FLAGS once, at start): XLA's defaults, YNNPACK fusions off,
YNNPACK reduce fusions, oneDNN dots, XNNPACK dots. neox-jax itself never sets a flag; a user may
(`XLA_FLAGS=... neox-jax serve ...`), and this table says whether it pays.

Each cell is the best of --repeats calls (after one that compiles). The floor: the weight's bytes over the memory
bandwidth measured in this run; a product at the floor reads its weights once at full speed.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys

import numpy as np

from neox_jax.bench._common import best_time, child_env, markdown_table, module_cmd, write_json

FLAG_SETS = {
    "defaults": "",
    "ynn off": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn reduce": "--xla_cpu_experimental_ynn_fusion_type=reduce",
    "onednn dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "xnnpack dot": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot",
}
DECODE_FORM = "W x^T kept"  # what neox-jax's decode runs (model.neox.Linear, transposed)


def weight_shapes(cfg) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of each distinct product of a decode step (per layer, and the output layer)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {
        "query_key_value": (d, 3 * d),
        "dense": (d, d),
        "dense_h_to_4h": (d, f),
        "dense_4h_to_h": (f, d),
        "embed_out": (d, cfg.vocab_size),
    }


def forms():
    """form -> (the weight's layout, 'io' [I, O] or 'oi' [O, I]; a jitted fn(x [B, I], w) -> [B, O])."""
    import jax
    import jax.numpy as jnp

    def kept(x, w):  # w [O, I]
        y = jax.lax.optimization_barrier(jnp.einsum("OI,BI->OB", w, x))  # [O, B] in memory
        return y.T

    def blocks(x, w):  # w [I, O]
        return jnp.concatenate([x @ part for part in jnp.split(w, 4, axis=1)], axis=1)

    return {
        "x @ W": ("io", jax.jit(lambda x, w: x @ w)),
        "W x^T kept": ("oi", jax.jit(kept)),
        "W x^T folded": ("oi", jax.jit(lambda x, w: jnp.einsum("OI,BI->OB", w, x).T)),
        "x W^T": ("oi", jax.jit(lambda x, w: jnp.einsum("BI,OI->BO", x, w))),
        "x @ W, 4 column blocks": ("io", jax.jit(blocks)),
    }


def worker(shapes: dict, rows: list[int], repeats: int) -> dict:
    """'name|rows|form' -> best ms, under the XLA_FLAGS this process started with."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    out = {}
    for name, (i, o) in shapes.items():
        w = rng.standard_normal((i, o), np.float32) * 0.02  # [I, O]
        layouts = {"io": jnp.asarray(w), "oi": jnp.asarray(np.ascontiguousarray(w.T))}
        for b in rows:
            x = jnp.asarray(rng.standard_normal((b, i), np.float32))
            ref = None
            for form, (layout, fn) in forms().items():
                wl = layouts[layout]
                y = np.asarray(fn(x, wl))  # (compiles)
                if ref is None:
                    ref = y
                elif not np.allclose(y, ref, rtol=1e-4, atol=1e-4):  # every form computes the same product
                    raise AssertionError(f"{form} on {name} rows {b}: differs from x @ W by {np.abs(y - ref).max()}")
                call = functools.partial(lambda f, w: f(x, w).block_until_ready(), fn, wl)
                out[f"{name}|{b}|{form}"] = best_time(call, repeats) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pythia-70m", help="a neox-jax preset whose weight shapes are measured")
    ap.add_argument("--rows", default="1,2,4,8,16,32", help="row counts (the decode batch), comma-separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--flags", default=",".join(FLAG_SETS), help=f"flag sets to run ({', '.join(FLAG_SETS)})")
    ap.add_argument("--quick", action="store_true", help="the tiny preset, rows 1 and 16, two flag sets, 3 repeats")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON of (shapes, rows, repeats)
    a = ap.parse_args()
    if a.worker:
        job = json.loads(a.worker)
        print(json.dumps(worker(job["shapes"], job["rows"], job["repeats"])))
        return

    from neox_jax.bench.generate import bandwidth_gbs
    from neox_jax.model.config import PRESETS, preset

    if a.quick:
        a.preset, a.rows, a.repeats, a.flags = "tiny", "1,16", 3, "defaults,ynn reduce"
    if a.preset not in PRESETS:
        sys.exit(f"--preset {a.preset!r}: not a preset; known: {', '.join(PRESETS)}")
    unknown = [f for f in a.flags.split(",") if f not in FLAG_SETS]
    if unknown:
        sys.exit(f"--flags: unknown flag set(s) {', '.join(unknown)}; known: {', '.join(FLAG_SETS)}")
    if "defaults" not in a.flags.split(","):
        sys.exit("--flags must include defaults: the form neox-jax runs is measured under XLA's defaults")
    shapes = weight_shapes(preset(a.preset))
    rows = [int(r) for r in a.rows.split(",")]
    job = json.dumps({"shapes": shapes, "rows": rows, "repeats": a.repeats})
    results = {}
    for flags in a.flags.split(","):
        print(f"flag set {flags!r}: XLA_FLAGS={FLAG_SETS[flags]!r}", file=sys.stderr, flush=True)
        r = subprocess.run(
            module_cmd("matmul", "--worker", job),
            env=child_env(XLA_FLAGS=FLAG_SETS[flags]),
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            sys.exit(f"flag set {flags!r} failed:\n{r.stderr[-2000:]}")
        results[flags] = json.loads(r.stdout.strip().splitlines()[-1])
    bw = bandwidth_gbs()
    table = []
    for name, (i, o) in shapes.items():
        for b in rows:
            cells = {
                (fl, form): ms
                for fl, res in results.items()
                for key, ms in res.items()
                for form in [key.split("|")[2]]
                if key.startswith(f"{name}|{b}|")
            }
            ours = cells[("defaults", DECODE_FORM)]
            (fl, form), best = min(cells.items(), key=lambda kv: kv[1])
            plain = {f: ms for (fl2, f), ms in cells.items() if fl2 == "defaults"}
            plain_form = min(plain, key=plain.get)
            floor = i * o * 4 / bw / 1e6  # ms: the float32 weight read once
            table.append(
                {
                    "product": f"[{b}, {i}] x [{i}, {o}] ({name})",
                    "rows": b,
                    "neox-jax form ms": ours,
                    "best form, default flags": plain_form,
                    "its ms": plain[plain_form],
                    "best ms": best,
                    "best form": form,
                    "best flags": fl,
                    "neox-jax / best": ours / best,
                    "floor ms": floor,
                    "neox-jax % of floor": 100 * floor / ours,
                }
            )
    cols = list(table[0])
    print(f"\n{a.preset} weight shapes, float32, best of {a.repeats} calls; bandwidth {bw:.1f} GB/s (this run)\n")
    print(markdown_table(table, cols))
    close = sum(r["neox-jax / best"] <= 1.1 for r in table)
    print(
        f"\nneox-jax's decode form (`{DECODE_FORM}`, default flags) is within 10% of the best on {close} of "
        f"{len(table)} products"
    )
    print("wrote", write_json("matmul", {"args": vars(a), "bandwidth_gbs": bw, "rows": table, "raw": results}, a.out))


if __name__ == "__main__":
    main()
