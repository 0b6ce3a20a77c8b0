"""Decode that scales with the batch: tokens/s at batch 1, 2, 4, 8, 16, 32 per dtype (float32, bfloat16, int8
weight-only with the output layer in float32 as `--quantize int8` keeps it, int8-all with it int8 too as
`convert quantize --embed-out` writes it), against the roofline and transformers, in one run.

    neox-jax benchmark decode                       # pythia-70m shapes, random weights
    neox-jax benchmark decode --quick               # tiny preset, batches 1, 4, 16, 8 new tokens
    neox-jax benchmark decode --preset pythia-160m --dtypes float32,int8 --batches 1,16

Each row: `model.generate`'s decode loop (greedy, no stop ids, a 32-token prompt; compile excluded), its ms per step
(the best of --repeats calls, the dtypes taken in turn each round) and tokens/s, and the roofline: the bytes one
step must read (every weight but the embedding table, which is only gathered, plus the batch's K and V caches at the
mean length) over the memory bandwidth measured in this run (a large numpy copy). `step vs batch 1` is the batch-b
step time over the batch-1 step: 1 means the batch came for free.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax.bench import llama_cpp
from neox_jax.bench._common import markdown_table, median_time, reference_skipped, write_json
from neox_jax.bench.generate import bandwidth_gbs
from neox_jax.inference.cache import cache_bytes
from neox_jax.inference.generate import Generator
from neox_jax.model import quantize as Q
from neox_jax.model import rowmatmul
from neox_jax.model.config import preset
from neox_jax.model.neox import LINEARS, init_params

DTYPES = {  # name -> (float dtype, int8 mode, embed_out int8 too)
    "float32": (jnp.float32, None, False),
    "bfloat16": (jnp.bfloat16, None, False),
    "int8": (jnp.float32, "int8", False),
    "int8-all": (jnp.float32, "int8", True),
}


def tokenizer_file() -> Path | None:
    """The 20B tokenizer in the first data directory that has it (llama.cpp's converter writes its vocabulary)."""
    from neox_jax.evaluation.tasks import data

    return next((d / "20B_tokenizer.json" for d in data.data_dirs() if (d / "20B_tokenizer.json").is_file()), None)


def step_bytes(cfg, params, batch: int, length: int) -> int:
    """Bytes one decode step reads: the weights but the embedding table, and the K / V caches (float32 on CPU)."""
    embed = params["embed_in"]["embedding"]
    return Q.param_bytes(params) - embed.size * embed.dtype.itemsize + cache_bytes(cfg, batch, length)


def run_linears(gen: Generator) -> list[tuple]:
    """(kernel [O, I], scale [O] or None) of every Linear in the generator's run layout, in model order."""
    found = []

    def walk(tree, name=None):
        if name in LINEARS and "kernel" in tree:
            found.append((tree["kernel"], tree.get("scale")))
            return
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, k)

    walk(gen.run_params(gen.run_layout()))
    return found


def matmul_floor_ms(linears, batch: int, how: str | None, repeats: int) -> float:
    """ms for every Linear of one decode step, once each, over `batch` rows in form `how` (None: rowmatmul.form's
    choice; "limbs": for the int8 kernels, the others their own), in one program: the weights stream from memory as
    in a step (median of repeats)."""

    @jax.jit
    def step(linears, x):  # x [batch, widest I]
        acc = jnp.zeros((), jnp.float32)
        for kernel, scale in linears:  # each product waits for the last (as in the model), through a scalar
            own = None if how == "limbs" and kernel.dtype != jnp.int8 else how  # limbs: int8 kernels only
            y = rowmatmul.matmul_t(kernel, x[:, : kernel.shape[1]] + acc * 1e-30, own)
            acc = (y if scale is None else y * scale)[0, 0]
        return acc

    x = jnp.asarray(np.random.RandomState(0).randn(batch, max(k.shape[1] for k, _ in linears)), jnp.float32)
    step(linears, x).block_until_ready()
    return median_time(lambda: step(linears, x).block_until_ready(), repeats) * 1e3


def forms_used(linears, batch: int) -> str:
    """rowmatmul.form's choice per kernel shape at this batch: 'reduce: 1536x512 int8, ...; dot: 50304x512 float32'."""
    by: dict[str, list[str]] = {}
    for k, _ in linears:
        shape = f"{k.shape[0]}x{k.shape[1]} {k.dtype.name}"
        names = by.setdefault(rowmatmul.form(k.dtype, batch, weights=k.size), [])
        if shape not in names:
            names.append(shape)
    return "; ".join(f"{f}: {', '.join(v)}" for f, v in by.items())


def floor_rows(name: str, linears, batch: int, bw: float, repeats: int) -> tuple[list[dict], dict]:
    """A decode step's matmuls in each form (every kernel in that form; float32 models: dot only) and in the chosen
    forms: (rows of the forms table, the fastest as {"floor_ms", "floor_form", "floor_Gelem/s", "floor_GB/s"})."""
    elems = sum(k.size for k, _ in linears)
    nbytes = sum(k.size * k.dtype.itemsize for k, _ in linears)
    low = any(k.dtype != jnp.float32 for k, _ in linears)
    rows = []
    int8 = any(k.dtype == jnp.int8 for k, _ in linears)
    for how in ("dot", "reduce", "rowwise") + ("limbs",) * int8 + (None,) if low else ("dot",):
        ms = matmul_floor_ms(linears, batch, how, repeats)
        row = {"dtype": name, "batch": batch, "form": how or "chosen", "ms": ms, "Gelem/s": elems / ms / 1e6}
        rows.append(row | {"GB/s": nbytes / ms / 1e6, "% of bandwidth": 100 * nbytes / ms / 1e6 / bw})
    best = min(rows, key=lambda r: r["ms"])
    floor = {"floor_ms": best["ms"], "floor_form": best["form"], "floor_Gelem/s": best["Gelem/s"]}
    return rows, floor | {"floor_GB/s": best["GB/s"]}


def step_runner(cfg, gen: Generator, batch: int, prompt: int, new: int):
    """A function timing one generate call at this batch: ms per decode step (compiled on the first call)."""
    ids = [list(np.random.RandomState(b).randint(0, cfg.vocab_size, prompt)) for b in range(batch)]

    def run():
        t = gen.generate(ids, max_new_tokens=new, stop_token_ids=[]).timing
        return t.decode_s / (t.decode_tokens / batch) * 1e3

    run()
    return run


def interleaved_best(runners: dict, repeats: int) -> dict:
    """name -> the best of `repeats` ms of each runner, the runners taken in turn each round: a busy spell on a
    shared machine slows one round of all of them rather than all rounds of one."""
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run())
    return {name: min(t) for name, t in times.items()}


def torch_ms(cfg, batch: int, prompt: int, new: int) -> float:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg.to_hf_config())).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        pre = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return (time.perf_counter() - t - pre) / (new - 1) * 1e3


def summary(rows: list[dict]) -> list[str]:
    """The targets in words: int8 against float32's tokens/s, bfloat16 against its roofline, each beside its floor."""
    at = {(r["dtype"], r["batch"]): r for r in rows}
    out = []
    for (name, b), r in at.items():
        f32 = at.get(("float32", b))
        if name.startswith("int8") and f32:
            out.append(
                f"{name} batch {b}: {r['tokens/s'] / f32['tokens/s']:.2f}x float32's tokens/s; its matmul floor "
                f"{f32['floor_ms'] / r['floor_ms']:.2f}x float32's ({r['floor_Gelem/s']:.1f} against "
                f"{f32['floor_Gelem/s']:.1f} G weights/s)"
            )
        if name == "bfloat16":
            out.append(
                f"bfloat16 batch {b}: {r['roofline_pct']:.0f}% of its roofline; its matmuls alone at their best "
                f"form reach {100 * r['roofline_ms'] / r['floor_ms']:.0f}% ({r['floor_GB/s']:.1f} GB/s)"
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pythia-70m")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8,int8-all", help=f"of {', '.join(DTYPES)}")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed generate calls per dtype and batch, interleaved (best kept)"
    )
    ap.add_argument("--floor-repeats", type=int, default=7, help="repeats of each matmul-floor program")
    ap.add_argument("--quick", action="store_true", help="tiny preset, batches 1,4,16, 8 new tokens, 1 repeat")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--llama-cpp",
        metavar="DIR",
        help="a built llama.cpp checkout: its llama-bench beside batch 1 in f32 / f16 / q8_0 (default: llama-bench "
        "on PATH, if there; skipped with --quick)",
    )
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args()
    if a.quick:
        a.preset, a.batches, a.new, a.repeats, a.floor_repeats = "tiny", "1,4,16", 8, 1, 1
    cfg = preset(a.preset)
    batches = [int(b) for b in a.batches.split(",")]
    bw = bandwidth_gbs(256)
    torch_ok = not a.no_torch and not reference_skipped("the transformers rows")
    base = init_params(cfg, jnp.float32)
    runs = {}  # dtype -> (params, generator, its Linears in the run layout)
    for name in a.dtypes.split(","):
        dtype, mode, embed_out = DTYPES[name]
        params = Q.cast_floats(base, dtype)
        params = Q.quantize_tree(params, mode, embed_out=embed_out) if mode else params
        gen = Generator(cfg, params)
        runs[name] = (params, gen, run_linears(gen))
    rows, forms = [], []
    for b in batches:  # batch by batch, every dtype in turn: a busy spell on the machine hits them alike
        runners = {name: step_runner(cfg, gen, b, a.prompt, a.new) for name, (_, gen, _) in runs.items()}
        best = interleaved_best(runners, a.repeats)
        for name, (params, _, linears) in runs.items():
            ms = best[name]
            roof = step_bytes(cfg, params, b, a.prompt + a.new // 2) / (bw * 1e9) * 1e3
            row = {"dtype": name, "batch": b, "step_ms": ms, "tokens/s": b / ms * 1e3}
            row |= {"roofline_ms": roof, "roofline_pct": 100 * roof / ms}
            form_rows, floor = floor_rows(name, linears, b, bw, a.floor_repeats)
            forms += [r | {"chosen forms": forms_used(linears, b)} if r["form"] == "chosen" else r for r in form_rows]
            rows.append(row | floor | {"step / floor": ms / floor["floor_ms"]})
            print(" ", rows[-1], flush=True)
    del runs
    order = list(a.dtypes.split(","))
    rows.sort(key=lambda r: (order.index(r["dtype"]), r["batch"]))
    forms.sort(key=lambda r: (order.index(r["dtype"]), r["batch"]))
    for r in rows:
        r["step vs batch 1"] = r["step_ms"] / next(o for o in rows if o["dtype"] == r["dtype"])["step_ms"]
        if torch_ok and r["dtype"] == "float32":  # after every JAX figure: torch's threads stay out of them
            r["transformers tokens/s"] = r["batch"] / torch_ms(cfg, r["batch"], a.prompt, a.new) * 1e3
    cols = ["dtype", "batch", "step_ms", "tokens/s", "step vs batch 1", "roofline_ms", "roofline_pct"]
    cols += ["floor_ms", "floor_form", "floor_Gelem/s", "floor_GB/s", "step / floor"]
    print(f"\n{a.preset} (random weights), prompt {a.prompt}, {a.new} new tokens; bandwidth {bw:.1f} GB/s\n")
    print(markdown_table(rows, cols + (["transformers tokens/s"] if torch_ok else [])))
    print("\nA step's matmuls alone (every Linear once, weights streamed from memory), per form:\n")
    print(markdown_table(forms, ["dtype", "batch", "form", "ms", "Gelem/s", "GB/s", "% of bandwidth", "chosen forms"]))
    print("\n" + "\n".join(summary(rows)))
    llama = [] if a.quick else llama_cpp.rows(cfg, a.new, tokenizer_file(), a.llama_cpp)
    if llama:
        ours = [
            {"engine": f"neox-jax {r['dtype']}", "batch": 1, "tokens/s": r["tokens/s"]} for r in rows if r["batch"] == 1
        ]
        print("\nllama.cpp's llama-bench on the same shapes, one sequence:\n")
        print(markdown_table(ours + llama, ["engine", "batch", "tokens/s", "stddev"]))
    payload = {"args": vars(a), "bandwidth_gbs": bw, "rows": rows, "forms": forms, "llama.cpp": llama}
    print("wrote", write_json("decode", payload, a.out))


if __name__ == "__main__":
    main()
