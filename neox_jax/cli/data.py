"""Megatron datasets (GPT-NeoX's and Pythia's training data): inspect, the batch at any step, tokenize, verify, merge,
shard. PREFIX names PREFIX.idx + PREFIX.bin (or PREFIX-000NN-of-000MM.bin shards, read as one), or a dataset on
the Hugging Face Hub, ORG/NAME[/PREFIX][@REVISION], of which a command downloads only the files it needs (each one
sha256-checked against the Hub's listing).

    neox-jax data inspect pile/document --json                  # items, documents, tokens, dtype, bytes, sha256s
    neox-jax data batch pile/document --step 1000 --out step1000.npy   # [1024, 2049] tokens Pythia trained on
    neox-jax data batch pile/document --step 1000 --batch-size 2 --decode --tokenizer 20B_tokenizer.json
    neox-jax data tokenize corpus.jsonl out/corpus --tokenizer 20B_tokenizer.json --append-eod
    neox-jax data verify pile/document --checksums shard_hashes.txt   # every pointer, then sha256 of each file
    neox-jax data merge pile/document out/document              # shards (or several datasets) -> one .bin + .idx
    neox-jax data shard out/document shards/ --shard-bytes 5000000000   # and back, with a .sha256 list
    neox-jax data batch EleutherAI/pile-deduped-pythia-preshuffled --step 1000 --out b.npy   # .idx + 1 shard
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "Megatron datasets: inspect, batch (Pythia's batch at a step), tokenize, verify, merge, shard"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    raw = argparse.RawDescriptionHelpFormatter

    s = sub.add_parser(
        "inspect", help="items, documents, tokens, dtype, bytes and sha256 of each file", formatter_class=raw
    )
    s.add_argument("prefix", metavar="PREFIX")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--no-hash", dest="hash", action="store_false", help="skip the sha256s (they read every byte)")

    s = sub.add_parser(
        "batch",
        help="the [batch, seq_len] tokens of one step in the preshuffled layout (Pythia's batch_viewer)",
        description="Step N is items [N * batch_size, (N + 1) * batch_size) of the preshuffled dataset; revision "
        "stepN of a Pythia model was saved after steps 0 .. N-1.",
    )
    s.add_argument("prefix", metavar="PREFIX")
    s.add_argument("--step", type=int, required=True, help="training step")
    s.add_argument("--batch-size", type=int, default=1024, help="sequences a step (default %(default)s, Pythia's)")
    s.add_argument("--seq-len", type=int, default=2049, help="tokens a sequence (default %(default)s, Pythia's)")
    s.add_argument("--out", metavar="FILE.npy", help="write the batch here (numpy .npy, the dataset's dtype)")
    s.add_argument("--decode", action="store_true", help="print each sequence as text (needs --tokenizer)")
    s.add_argument("--tokenizer", help="tokenizer.json for --decode (e.g. 20B_tokenizer.json)")

    s = sub.add_parser(
        "tokenize",
        help="text -> a dataset, as GPT-NeoX's preprocess_data.py (uint16 below 65,500 ids, else int32)",
        description="INPUT files in order: .jsonl (one document a line, its --jsonl-key field) or any other file "
        "(one document). One item per document. Written under temporary names: a crash leaves no OUT_PREFIX.idx.",
    )
    s.add_argument("inputs", nargs="+", metavar="INPUT")
    s.add_argument("out_prefix", metavar="OUT_PREFIX")
    s.add_argument("--tokenizer", required=True, help="tokenizer.json (e.g. 20B_tokenizer.json)")
    s.add_argument("--append-eod", action="store_true", help="end each document with <|endoftext|> (Pythia did)")
    s.add_argument("--jsonl-key", default="text", help="the field of each JSON line (default %(default)s)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUT_PREFIX")
    s.add_argument("--no-progress", dest="progress", action="store_false")

    s = sub.add_parser("verify", help="check every pointer, then each file's sha256 against a checksum list")
    s.add_argument("prefix", metavar="PREFIX")
    s.add_argument("--checksums", metavar="FILE", help="'sha256  filename' or 'filename sha256' lines")
    s.add_argument("--no-progress", dest="progress", action="store_false")

    s = sub.add_parser("merge", help="datasets or shards -> one OUT.bin + OUT.idx (+ OUT.sha256)")
    s.add_argument("prefixes", nargs="+", metavar="PREFIX")
    s.add_argument("out_prefix", metavar="OUT_PREFIX")
    s.add_argument("--no-progress", dest="progress", action="store_false")

    s = sub.add_parser("shard", help="split PREFIX.bin into NAME-000NN-of-000MM.bin shards (+ NAME.idx, NAME.sha256)")
    s.add_argument("prefix", metavar="PREFIX")
    s.add_argument("out_dir", metavar="OUT_DIR")
    s.add_argument("--shard-bytes", type=int, default=5_000_000_000, help="bytes a shard (default %(default)s)")
    s.add_argument("--no-progress", dest="progress", action="store_false")


def _inspect(args) -> int:
    from neox_jax.data import files
    from neox_jax.data.hub import open_any

    ds = open_any(args.prefix, range(0))  # a Hub dataset: the index alone
    ds.check()
    sizes = ds.sizes
    info = {
        "prefix": ds.prefix,
        "items": len(ds),
        "documents": ds.num_documents,
        "tokens": ds.num_tokens,
        "dtype": str(ds.dtype),
        "bytes": ds.nbytes + ds.idx_path.stat().st_size,
        "item_tokens": {"min": int(sizes.min()), "max": int(sizes.max())} if len(ds) else None,
        "files": [
            {"path": str(p), "bytes": p.stat().st_size, **({"sha256": files.sha256_file(p)} if args.hash else {})}
            if p.is_file()
            else {"path": str(p), "bytes": int(n), "present": False}
            for p, n in zip(files.dataset_files(ds), [ds.idx_path.stat().st_size, *ds.bin_sizes], strict=True)
        ],
    }
    if args.json:
        print(json.dumps(info))
        return 0
    it = info["item_tokens"]
    print(
        f"{ds.prefix}: {info['items']:,} items in {info['documents']:,} documents, {info['tokens']:,} {info['dtype']} "
        f"tokens" + (f" ({it['min']}..{it['max']} a item)" if it else "")
    )
    for f in info["files"]:
        more = f"  sha256 {f['sha256']}" if "sha256" in f else "  (not downloaded)" if "present" in f else ""
        print(f"  {f['path']}  {f['bytes']:,} bytes{more}")
    return 0


def _batch(args) -> int:
    import numpy as np

    from neox_jax.data import pythia_batch, pythia_items
    from neox_jax.data.hub import open_any
    from neox_jax.data.writer import temp_beside
    from neox_jax.errors import NeoXError

    if not (args.out or args.decode):
        raise NeoXError("data batch: pass --out FILE.npy and/or --decode")
    if args.decode and not args.tokenizer:
        raise NeoXError("--decode needs --tokenizer (the dataset stores ids only)")
    ds = open_any(args.prefix, pythia_items(args.step, args.batch_size))  # a Hub dataset: the shards of this step
    batch = pythia_batch(ds, args.step, args.batch_size, args.seq_len)  # [batch, seq_len]
    if args.out:
        out = Path(args.out)
        tmp = temp_beside(out, ".npy")
        try:
            np.save(tmp, batch)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"step {args.step}: {batch.shape[0]} x {batch.shape[1]} {batch.dtype} tokens -> {out}", file=sys.stderr)
    if args.decode:
        from neox_jax.data.tokenize import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        for row in batch:
            print(tok.decode(row.tolist(), skip_special_tokens=False))
    return 0


def _tokenize(args) -> int:
    from neox_jax.data.tokenize import tokenize_files

    s = tokenize_files(
        args.inputs, args.out_prefix, args.tokenizer, args.append_eod, args.jsonl_key, args.overwrite, args.progress
    )
    skipped = f"; {s.empty_skipped} empty documents skipped" if s.empty_skipped else ""
    print(f"{s.documents:,} documents, {s.tokens:,} {s.dtype} tokens -> {s.prefix}.bin, {s.prefix}.idx{skipped}")
    return 0


def _verify(args) -> int:
    from neox_jax.data import files

    for name, digest in files.verify(args.prefix, args.checksums, args.progress).items():
        print(f"{digest}  {name}" + ("  OK" if args.checksums else ""))
    print(
        f"{args.prefix}: every pointer agrees with the sizes"
        + (f"; sha256s match {args.checksums}" if args.checksums else "")
    )
    return 0


def _merge(args) -> int:
    from neox_jax.data import files

    digests = files.merge(args.prefixes, args.out_prefix, args.progress)
    print(f"-> {', '.join(f'{args.out_prefix}{Path(n).suffix}' for n in digests)}; sha256s in {args.out_prefix}.sha256")
    return 0


def _shard(args) -> int:
    from neox_jax.data import files

    digests = files.shard(args.prefix, args.out_dir, args.shard_bytes, args.progress)
    name = next(n for n in digests if n.endswith(".idx"))[: -len(".idx")]
    print(f"{len(digests) - 1} shards + {name}.idx -> {args.out_dir} (sha256s in {Path(args.out_dir) / name}.sha256)")
    return 0


ACTIONS = {"inspect": _inspect, "batch": _batch, "tokenize": _tokenize, "verify": _verify, "merge": _merge,
           "shard": _shard}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.action](args)
