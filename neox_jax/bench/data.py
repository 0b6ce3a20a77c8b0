"""Megatron datasets: the batch at a step of a multi-GB file, and tokenizing throughput.

batch     a sparse Pythia-layout dataset of --gb GB (items of 2049 uint16 tokens, a real .idx, the .bin a hole:
          no disk used): open + the [1024, 2049] batch of its last step (past 2^31 tokens) + a copy into RAM, the
          median of three fresh processes, for neox_jax.data.pythia_batch and megatron-core's IndexedDataset slice
          (the reference reader); peak RSS shows neither reads the file
tokenize  the same documents (synthetic words, --mb MB of jsonl) through the `tokenizers` batch encoder alone
          (texts in memory, the ceiling) and through `neox-jax data tokenize` (read jsonl, encode, write .bin/.idx)

  python scripts/benchmark.py data [--gb 8] [--mb 8] [--tokenizer ../shared/data/20B_tokenizer.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from neox_jax.bench._common import child_env, markdown_table, run_json, write_json

SEQ, BATCH = 2049, 1024
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which but".split()

READ_OURS = """
import json, resource, sys, time
t = time.perf_counter()
import numpy as np
from neox_jax.data import IndexedDataset, pythia_batch
t_import = time.perf_counter() - t
t = time.perf_counter()
ds = IndexedDataset(sys.argv[1])
b = np.array(pythia_batch(ds, int(sys.argv[2])))
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "import_s": t_import, "shape": list(b.shape),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
READ_MCORE = """
import json, resource, sys, time
t = time.perf_counter()
import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset
t_import = time.perf_counter() - t
t = time.perf_counter()
ds = IndexedDataset(sys.argv[1], mmap=True)
s = int(sys.argv[2])
b = np.stack(ds[s * 1024 : (s + 1) * 1024])
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "import_s": t_import, "shape": list(b.shape),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_batch(d: Path, gb: float) -> list[dict]:
    import numpy as np

    from neox_jax.data import write_index

    items = int(gb * 1e9) // (2 * SEQ) // BATCH * BATCH
    write_index(d / "big.idx", np.full(items, SEQ, np.int64), np.arange(items + 1), np.uint16)
    with open(d / "big.bin", "wb") as f:
        f.truncate(items * SEQ * 2)
    step = items // BATCH - 1
    rows = []
    for name, code in (("neox_jax.data.pythia_batch", READ_OURS), ("megatron-core IndexedDataset[a:b]", READ_MCORE)):
        runs = [
            run_json([sys.executable, "-c", code, str(d / "big"), str(step)], name, env=child_env()) for _ in range(3)
        ]
        r = sorted(runs, key=lambda x: x["s"])[1]  # the median of three fresh processes
        rows.append({"reader": name, "file_GB": items * SEQ * 2 / 1e9, "step": step, "tokens": items * SEQ,
                     "batch_ms": 1e3 * r["s"], "peak_rss_MB": r["rss_mb"]})  # fmt: skip
    return rows


def bench_tokenize(d: Path, mb: float, tokenizer: Path) -> list[dict]:
    import numpy as np
    from tokenizers import Tokenizer

    from neox_jax.data.tokenize import tokenize_files

    rng = np.random.default_rng(0)
    docs, size = [], 0
    while size < mb * 1e6:
        doc = " ".join(rng.choice(WORDS, int(rng.integers(50, 800))))
        docs.append(doc)
        size += len(doc)
    path = d / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = Tokenizer.from_file(str(tokenizer))
    t = time.perf_counter()
    n_ref = sum(len(e.ids) for i in range(0, len(docs), 1024) for e in tok.encode_batch(docs[i : i + 1024]))
    ref_s = time.perf_counter() - t
    t = time.perf_counter()
    stats = tokenize_files([path], d / "tok", tokenizer, append_eod=True, progress=False)
    ours_s = time.perf_counter() - t
    assert stats.tokens == n_ref + len(docs), (stats.tokens, n_ref)
    return [
        {"path": "tokenizers encode_batch (texts in memory)", "MB_text": size / 1e6, "s": ref_s,
         "MB_per_s": size / 1e6 / ref_s, "Mtokens_per_s": n_ref / 1e6 / ref_s},
        {"path": "neox-jax data tokenize (jsonl -> .bin/.idx)", "MB_text": size / 1e6, "s": ours_s,
         "MB_per_s": size / 1e6 / ours_s, "Mtokens_per_s": stats.tokens / 1e6 / ours_s},
    ]  # fmt: skip


def _bpe(d: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator([" ".join(WORDS)] * 50, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    tk.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=8.0, help="size of the sparse dataset (default %(default)s)")
    p.add_argument("--mb", type=float, default=8.0, help="MB of text to tokenize (default %(default)s)")
    p.add_argument("--tokenizer", type=Path, default=Path("../shared/data/20B_tokenizer.json"))
    p.add_argument("--out-dir", default="bench_out")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tokenizer = args.tokenizer if args.tokenizer.is_file() else _bpe(d)
        batch = bench_batch(d, args.gb)
        tok = bench_tokenize(d, args.mb, tokenizer)
    print(markdown_table(batch, ["reader", "file_GB", "step", "tokens", "batch_ms", "peak_rss_MB"]))
    print()
    print(f"tokenizer: {tokenizer.name}")
    print(markdown_table(tok, ["path", "MB_text", "s", "MB_per_s", "Mtokens_per_s"]))
    out = write_json("data", {"batch": batch, "tokenize": tok, "tokenizer": str(tokenizer)}, args.out_dir)
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
