"""The neox-jax demo: the whole path on a tiny random GPT-NeoX, no downloads, no ../shared needed.

1. builds a tiny random GPT-NeoX in Hugging Face format (transformers' GPTNeoXForCausalLM, save_pretrained), with a
   byte-level BPE tokenizer trained here on a few paragraphs;
2. converts it with the real converter (`neox-jax convert hf`, the same code path as for Pythia / GPT-NeoX-20B);
3. loads it with `neox_jax.load` and compares its logits with transformers';
4. shows what the model does: next-token probabilities, then streamed generation from the KV-cache decoder;
5. fine-tunes its biases (BitFit) for a few steps with `neox-jax finetune` and generates with the result;
6. quantizes it to int8 (LLM.int8) and generates again;
7. evaluates it with lm-evaluation-harness on LAMBADA / PIQA (only when ../shared/data is present).

THE WEIGHTS ARE RANDOM: the text it makes is noise. Everything else is the real thing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CORPUS = """GPT-NeoX-20B is a 20 billion parameter autoregressive language model trained on the Pile.
Its architecture largely follows that of GPT-3, with a few notable deviations: rotary positional embeddings are
applied to the first quarter of each attention head, the attention and feed-forward layers are computed in parallel
and added to the residual stream, and the output embedding is untied from the input embedding.
The Pythia suite shares this architecture at sizes from 70 million to 12 billion parameters.
Einstein was born in the German Empire, but moved to Switzerland in 1895, forsaking his German citizenship.
"""


def banner(text: str) -> None:
    print(f"\n== {text}")


def train_tokenizer(path: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    tok.save(str(path))


def build_hf_model(out: Path, vocab_size: int):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        rotary_pct=0.25,
        max_position_embeddings=256,
        use_parallel_residual=True,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return model


def run(*cmd: str) -> None:
    """Runs a project script the way a user would, from the repo root, echoing the command."""
    import os
    import subprocess

    print("$ python " + " ".join(cmd))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "demo_out"), help="where the demo writes (default: demo_out/)")
    args = ap.parse_args()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    banner("1. a tiny random GPT-NeoX in Hugging Face format (random weights: its text is noise)")
    hf_dir = work / "hf-tiny"
    hf_dir.mkdir()
    train_tokenizer(hf_dir / "tokenizer.json")
    from neox_jax.store.tokenizer import Tokenizer

    tok = Tokenizer.from_file(hf_dir / "tokenizer.json")
    vocab = (tok.vocab_size // 64 + 1) * 64  # padded embedding rows the tokenizer never produces, as Pythia / 20B have
    hf_model = build_hf_model(hf_dir, vocab)
    print(f"tokenizer: {tok.vocab_size} ids (trained here); embedding rows: {vocab}; saved to {hf_dir}")

    banner("2. convert with the real converter: neox-jax convert hf")
    from convert.hf import convert_hf

    ckpt = work / "ckpt-tiny"
    s = convert_hf(hf_dir, ckpt, "float32", progress=False)
    print(f"wrote {s['out']}: {s['params']:,} parameters, {s['bytes'] / 1e6:.2f} MB in {s['seconds']:.2f} s")

    banner("3. load with neox_jax.load and compare with transformers")
    import numpy as np
    import torch

    import neox_jax

    model = neox_jax.load(ckpt)
    print(model)
    prompt = "Einstein was born in the German Empire, but moved to"
    ids = np.asarray([tok.encode(prompt)])
    t = time.perf_counter()
    logits = model.logits(ids)
    print(f"logits {logits.shape} float32 in {time.perf_counter() - t:.2f} s (includes compiling)")
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    print(f"max |neox-jax - transformers| = {np.abs(logits - ref).max():.2e}  (float32; tests require <= 1e-4)")

    banner("4. what the model does (random weights)")
    last = logits[0, -1, : tok.vocab_size]
    top = np.argsort(-last)[:5]
    probs = np.exp(last - last.max()) / np.exp(last - last.max()).sum()
    print(f"prompt: {prompt!r}")
    for i in top:
        print(f"  next token {tok.decode([int(i)])!r:>14}  p={probs[i]:.3f}")

    print("\nstreamed generation (greedy, KV cache, one compiled decode loop):")
    print(f"  {prompt}", end="", flush=True)
    stream = model.generate_stream([prompt], max_new_tokens=24)
    for event in stream:
        print(event.texts[0], end="", flush=True)
    r = stream.result
    print(f"\n  finish: {r.finish_reasons[0]}; {r.timing.to_dict()}")

    banner("5. fine-tune the biases (BitFit) for 30 steps: neox-jax finetune")
    (work / "text.txt").write_text(CORPUS * 20)
    run_dir = work / "finetune-run"
    run(
        "scripts/finetune.py",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(work / "text.txt"),
        "--out",
        str(run_dir),
        "--steps",
        "30",
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--lr",
        "3e-2",
        "--save-every",
        "15",
        "--eval-every",
        "15",
        "--no-progress",
    )
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} logged steps (biases only)")
    tuned = neox_jax.load(ckpt, finetuned=run_dir)
    r = tuned.generate([prompt], max_new_tokens=24)
    print(f"fine-tuned completion: {prompt}{r.texts[0]!r}")

    banner("6. int8 (LLM.int8: int8 weights, outlier features in float) and generate again")
    q = neox_jax.load(ckpt, quantize="llm.int8")
    r = q.generate([prompt], max_new_tokens=12)
    print(f"int8 completion: {prompt}{r.texts[0]!r}")

    banner("7. evaluate with lm-evaluation-harness (neox-jax backend)")
    shared = ROOT.parent / "shared" / "data"
    if (shared / "lambada_openai").is_dir() and (shared / "piqa").is_dir():
        run(
            "scripts/evaluate.py",
            "--checkpoint",
            str(ckpt),
            "--tasks",
            "lambada_openai,piqa",
            "--limit",
            "16",
            "--batch-size",
            "8",
            "--output",
            str(work / "eval.json"),
        )
    else:
        print(f"skipped: the local task data ({shared}) is absent; see README 'Evaluation' for real use")

    print(f"\ndone: everything the demo wrote is in {work}")


if __name__ == "__main__":
    main()
