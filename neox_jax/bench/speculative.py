"""Speculative decoding: a trained target alone vs the target with a trained draft, side by side in one run.

    neox-jax benchmark speculative                 # train both (a few minutes on 2 cores), then measure
    neox-jax benchmark speculative --work runs/spec --reuse   # measure again with the models trained before
    neox-jax benchmark speculative --k 2,4,6 --max-new-tokens 128

Random weights agree only by chance, so the benchmark first trains a target (6 layers x 384) and a draft (2 x 128)
from random init on tiny shakespeare with `neox-jax finetune --trainable all`, with a byte-level BPE tokenizer
trained here on the same text (2048 ids: Pythia's 50k-id embedding would be most of these tiny models' work, unlike a
real Pythia pair). Then, greedy, on prompts cut from the text: the target alone, the target with the draft proposing k
tokens a step, and the target as its own draft (every token accepted: the upper bound, at the k that was fastest with
the draft), at batch 1 and 4. Speedup = the target alone's wall time / speculative wall time for the same prompts and
tokens (medians of --repeats warm calls taken in turn with the target alone's, compiles excluded); outputs are
checked to be equal token for token. Also measured: one target decode step and one draft decode step (each model's
own loop, per token), whose ratio bounds what a draft can save, and what a round is made of: one extend of the target
over k+1 tokens from the cache (the verify) and of 1 token (a step), and a draft step (a round makes k+1: k
proposals, the last one fed too), each timed in a compiled loop of its own, in turn. From them each row's ceiling:
tokens per round x step / (verify + (k+1) draft steps), the speedup its measured acceptance allows if a round cost
nothing but its forwards; so a row short of a target speedup shows whether acceptance, the verify's cost or the rest of
the round stops it. Run --train-only once, then --reuse to measure again without training.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from neox_jax.bench._common import child_env, markdown_table, write_json

DATA = Path("../shared/data/tinyshakespeare/input.txt")  # the shared reference data beside the checkout
VOCAB = 2048
SHAPES = {"target": (384, 6, 6), "draft": (128, 2, 2)}  # hidden, layers, heads


def train_tokenizer(text_file: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train([str(text_file)], trainer)
    tk.save(str(out))
    return out


def init_checkpoint(name: str, tok_file: Path, out: Path, seed: int) -> Path:
    from neox_jax.model.config import NeoXConfig
    from neox_jax.model.neox import init_params
    from neox_jax.store.checkpoint import save_params

    d, layers, heads = SHAPES[name]
    cfg = NeoXConfig(
        vocab_size=VOCAB + 64,  # padded rows, as Pythia's
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * d,
        max_position_embeddings=512,
    )
    return save_params(out, cfg, init_params(cfg, seed=seed), tokenizer_file=tok_file, overwrite=True)


def finetune(ckpt: Path, data: Path, run_dir: Path, steps: int, batch: int, seq: int) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "neox_jax", "finetune", "--checkpoint", str(ckpt), "--data", str(data)]
    cmd += ["--out", str(run_dir), "--trainable", "all", "--steps", str(steps), "--batch-size", str(batch)]
    cmd += ["--seq-len", str(seq), "--lr", "2e-3", "--warmup-steps", str(steps // 10), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if r.returncode:
        sys.exit(f"finetune {ckpt} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def timed(fn, repeats: int):
    fn()  # compiles
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def step_ms(model, prompt, tokens: int, repeats: int) -> float:
    """One decode step of the model's own loop, per token (batch 1, greedy, prefill excluded)."""
    _, r = timed(lambda: model.generate([prompt], max_new_tokens=tokens, stop_token_ids=[]), repeats)
    return 1e3 * r.timing.decode_s / max(1, r.timing.decode_tokens)


def extend_loop(model, rows: int, t: int, cache_len: int, prompt_len: int = 32, n: int = 32):
    """A compiled loop of n core.extend calls of t tokens per row from a cache of cache_len slots holding a
    prompt_len-token prompt, rows rows (batch 1: the uniform in-place write speculative decoding uses there; more: the
    per-row write), each rolled back so every call sees the same slots. Returns a function running it once and
    returning ms per extend. t = 1 is a decode step, t = k + 1 a speculative verify."""
    import jax
    import jax.numpy as jnp

    from neox_jax.inference import core, sampling

    gen = model.generator()
    cfg, layout = model.config, gen.run_layout()
    params = gen.run_params(layout)
    uniform = rows == 1
    settings = {"stop_mask": jnp.zeros((rows, cfg.vocab_size), bool), "max_new": jnp.full((rows,), 2**30, jnp.int32)}
    greedy = sampling.Static(True, 0, False, False, cfg.vocab_size)

    @jax.jit
    def start(params):
        st = core.empty_state(cfg, layout, rows, cache_len, settings, False, False)
        ids = jnp.full((rows, prompt_len), 5, jnp.int32)
        return core.prefill_into(cfg, greedy, layout, params, st, 0, ids, jnp.ones_like(ids))[0]

    def loop(params, st):
        def body(i, carry):
            st, acc = carry
            ids = jnp.full((rows, t), 7, jnp.int32) + (acc > 1e30)  # (acc: each call depends on the one before)
            new, logits = core.extend(cfg, layout, params, st, ids, uniform)
            return core.rollback(new, st.lengths), acc + logits[0, -1, 0]

        return jax.lax.fori_loop(0, n, body, (st, jnp.float32(0)))

    opts = core.CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else {}
    run = jax.jit(loop, donate_argnums=(1,)).lower(params, start(params)).compile(compiler_options=opts)
    state = [start(params)]

    def once() -> float:
        t0 = time.perf_counter()
        state[0], acc = run(params, state[0])
        acc.block_until_ready()
        return 1e3 * (time.perf_counter() - t0) / n

    once()
    return once


def interleaved(fns: dict, repeats: int) -> dict:
    """name -> the median of `repeats` calls of fns[name](), the calls taken in turn (name by name, then again), so a
    change in the machine's load falls on every one alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="tiny shakespeare input.txt")
    ap.add_argument("--work", type=Path, default=Path("bench_out/speculative"), help="checkpoints and runs")
    ap.add_argument("--reuse", action="store_true", help="use the models trained by an earlier run in --work")
    ap.add_argument("--train-only", action="store_true", help="train the pair into --work, measure nothing")
    ap.add_argument("--target-steps", type=int, default=200)
    ap.add_argument("--draft-steps", type=int, default=300)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=64)
    ap.add_argument("--k", default="2,3,4,6", help="draft tokens per step to try (comma-separated)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent (tiny shakespeare, from the shared reference data)")
        return 0
    import neox_jax

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tok_file = work / "tokenizer.json"
    train_s = {}
    if not (args.reuse and (work / "runs" / "draft" / "finetuned").exists()):
        print(f"training a {VOCAB}-id BPE tokenizer, then target and draft from random init -> {work}", flush=True)
        train_tokenizer(args.data, tok_file)
        for seed, (name, steps) in enumerate((("target", args.target_steps), ("draft", args.draft_steps))):
            ckpt = init_checkpoint(name, tok_file, work / "ckpt" / name, seed)
            train_s[name] = finetune(ckpt, args.data, work / "runs" / name, steps, args.train_batch, args.train_seq)
            print(f"  {name} {SHAPES[name]}: {steps} steps in {train_s[name]:.0f} s", flush=True)
        write_json("train", train_s, work)
    if args.train_only:
        return 0
    target = neox_jax.load(work / "ckpt" / "target", finetuned=work / "runs" / "target")
    draft = neox_jax.load(work / "ckpt" / "draft", finetuned=work / "runs" / "draft")
    text = args.data.read_text()
    starts = [len(text) * i // 5 for i in range(1, 5)]
    prompts = [text[s : s + 200].split("\n", 1)[1][:120] for s in starts]  # from a line start
    n_new, rows, costs = args.max_new_tokens, [], {}  # costs: (model, batch, tokens) -> ms of one extend
    t_ms, d_ms = step_ms(target, prompts[0], n_new, args.repeats), step_ms(draft, prompts[0], n_new, args.repeats)
    print(f"decode step: target {t_ms:.2f} ms, draft {d_ms:.2f} ms (ratio {t_ms / d_ms:.1f})", flush=True)
    cache_len = 64 * -(-(32 + n_new + max(int(x) for x in args.k.split(","))) // 64)  # as the driver sizes it
    ks = [int(x) for x in args.k.split(",")]
    for batch in (1, 4):
        ps = prompts[:batch]
        kw = dict(max_new_tokens=n_new, stop_token_ids=[])
        results = {}

        def call(dm, k, key):
            def fn():
                t0 = time.perf_counter()
                r = target.generate(ps, **kw) if dm is None else target.generate(ps, draft=dm, draft_tokens=k, **kw)
                results[key] = r
                return time.perf_counter() - t0

            fn()  # compiles
            return fn

        # the target alone and with the draft at every k, timed in turn; then the target as its own draft at the
        # fastest k, in turn with the target alone again
        secs = interleaved({"none": call(None, 0, "none"), **{k: call(draft, k, k) for k in ks}}, args.repeats)
        best_k = min(ks, key=lambda k: secs[k])
        again = interleaved({"none": call(None, 0, "none"), "itself": call(target, best_k, "itself")}, args.repeats)
        base = results["none"]
        # what a round costs by its parts, each timed alone in a compiled loop, in turn: a target step (1 token),
        # the verify (k+1 tokens) and a draft step (a round makes k+1 of them: each proposal, and the last one fed
        # too); the ceiling is the speedup the measured acceptance allows if a round cost nothing else
        loops = {
            ("target", 1): extend_loop(target, batch, 1, cache_len),
            ("draft", 1): extend_loop(draft, batch, 1, cache_len),
        }
        loops.update({("target", k + 1): extend_loop(target, batch, k + 1, cache_len) for k in ks})
        ms = interleaved(loops, max(5, args.repeats))
        costs.update({(m, batch, t): v for (m, t), v in ms.items()})
        rows.append(
            {"batch": batch, "draft": "none", "k": 0, "s": secs["none"], "tokens_per_s": batch * n_new / secs["none"]}
        )
        for name, key, k, s, base_s in [("draft 2x128", k, k, secs[k], secs["none"]) for k in ks] + [
            ("target itself", "itself", best_k, again["itself"], again["none"])
        ]:
            r = results[key]
            if r.token_ids != base.token_ids:
                sys.exit(f"speculative output differs from the target's (batch {batch}, {name}, k {k})")
            st = r.speculative
            step, verify = ms["target", 1], ms["target", k + 1]
            drafting = (k + 1) * ms["target" if key == "itself" else "draft", 1]
            rows.append(
                {
                    "batch": batch,
                    "draft": name,
                    "k": k,
                    "s": s,
                    "tokens_per_s": batch * n_new / s,
                    "acceptance": st["acceptance_rate"],
                    "tokens_per_step": st["tokens_per_target_step"],
                    "verify_steps": verify / step,
                    "draft_steps": drafting / step,
                    "round_ms": 1e3 * r.timing.decode_s / (st["target_steps"] / batch),
                    "parts_ms": verify + drafting,
                    "ceiling": st["tokens_per_target_step"] * step / (verify + drafting),
                    "speedup": base_s / s,
                }
            )
            print(markdown_table(rows[-1:], list(rows[-1])), flush=True)
    cols = ["batch", "draft", "k", "s", "tokens_per_s", "acceptance", "tokens_per_step"]
    cols += ["verify_steps", "draft_steps", "round_ms", "parts_ms", "ceiling", "speedup"]
    print(markdown_table(rows, cols))
    best = max((r for r in rows if r["batch"] == 1 and r["draft"] == "draft 2x128"), key=lambda r: r["speedup"])
    top = max((r for r in rows if r["batch"] == 1 and r["draft"] == "draft 2x128"), key=lambda r: r["ceiling"])
    print(
        f"best at batch 1: k {best['k']}, {best['speedup']:.2f}x (ceiling {best['ceiling']:.2f}x); highest ceiling "
        f"k {top['k']}, {top['ceiling']:.2f}x. One extend of the target from the cache (batch 1): "
        + ", ".join(
            f"{t} token{'s' * (t > 1)} {ms:.2f} ms"
            for (m, b, t), ms in sorted(costs.items())
            if m == "target" and b == 1
        )
        + f"; the draft's step: {costs['draft', 1, 1]:.3f} ms. "
        "ceiling = tokens per round x step / (verify + (k+1) draft steps): the speedup the measured acceptance "
        "allows if a round cost only its forwards; verify_steps / draft_steps: those costs in target steps"
    )
    path = write_json(
        "speculative",
        {
            "train_s": train_s,
            "shapes": SHAPES,
            "vocab": VOCAB,
            "max_new_tokens": n_new,
            "target_step_ms": t_ms,
            "draft_step_ms": d_ms,
            "extend_ms": {f"{m} batch {b} tokens {t}": ms for (m, b, t), ms in sorted(costs.items())},
            "rows": rows,
        },
        args.out,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
