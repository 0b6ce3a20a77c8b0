"""Text -> a Megatron dataset, as GPT-NeoX's tools/datasets/preprocess_data.py makes it.

    .jsonl: one document per line, its `text` field (--jsonl-key);  other files: one document each (UTF-8)
      -> ids = tokenizer.encode(text).ids (the `tokenizers` library, special tokens as the tokenizer adds them)
      -> + end-of-text (<|endoftext|>) when append_eod
      -> one item per document, one document per item (doc_idx = 0, 1, 2, ...)
      -> dtype uint16 when the vocabulary has fewer than 65,500 ids, else int32

Documents stream through in batches (the tokenizer's own batch encoder), so memory stays flat; a document with no
tokens is skipped (GPT-NeoX would fail on it with append_eod) and counted. The output is written under temporary names
and renamed into place only when every input was read (writer.Writer): a crash or a bad line leaves no PREFIX.idx.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from neox_jax.data.writer import Writer, best_dtype
from neox_jax.errors import DataError

EOD_TOKEN = "<|endoftext|>"
BATCH = 1024  # documents per call of the batch encoder


@dataclasses.dataclass
class TokenizeStats:
    prefix: str
    documents: int = 0
    tokens: int = 0
    empty_skipped: int = 0
    dtype: str = ""
    text_bytes: int = 0


def read_texts(path: Path, key: str = "text", progress=None) -> Iterator[str]:
    """The documents of one input file; `progress(nbytes)` is told how many bytes each one consumed."""
    if not path.is_file():
        raise DataError(f"{path}: no such input file")
    if path.suffix.lower() != ".jsonl":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        if progress:
            progress(path.stat().st_size)
        yield text
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if progress:
                progress(len(raw))
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string {key!r} field")
            yield obj[key]


def load_tokenizer(path: str | os.PathLike):
    """A `tokenizers.Tokenizer` from a tokenizer.json (or a directory holding one)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: no tokenizer file (--tokenizer names a tokenizer.json, e.g. 20B_tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a `tokenizers` JSON file ({e})") from None


def tokenize_files(
    inputs: Sequence[str | os.PathLike],
    out_prefix: str | os.PathLike,
    tokenizer: str | os.PathLike,
    append_eod: bool = False,
    key: str = "text",
    overwrite: bool = False,
    progress: bool = True,
    batch: int = BATCH,
) -> TokenizeStats:
    """Tokenizes the inputs, in order, into OUT_PREFIX.bin / OUT_PREFIX.idx; returns what was written."""
    from tqdm import tqdm

    tok = load_tokenizer(tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eod = tok.token_to_id(EOD_TOKEN)
    if append_eod and eod is None:
        raise DataError(f"{tokenizer}: has no {EOD_TOKEN} token to append (--append-eod)")
    dtype = best_dtype(vocab)
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such input file")
    stats = TokenizeStats(str(out_prefix), dtype=str(dtype), text_bytes=sum(p.stat().st_size for p in paths))
    bar = tqdm(total=stats.text_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress)

    def flush(w: Writer, texts: list[str]) -> None:
        ids = [e.ids for e in tok.encode_batch(texts)]  # lists of ints, one a document
        kept = [x + [eod] if append_eod else x for x in ids if x]
        stats.empty_skipped += len(ids) - len(kept)
        sizes = [len(x) for x in kept]
        flat = np.fromiter(itertools.chain.from_iterable(kept), np.int64, sum(sizes))
        w.add_documents(flat, sizes)  # one write a batch
        stats.documents += len(kept)
        stats.tokens += flat.size
        texts.clear()

    with Writer(out_prefix, dtype, overwrite=overwrite) as w:
        pending: list[str] = []
        for p in paths:
            for text in read_texts(p, key, bar.update):
                pending.append(text)
                if len(pending) >= batch:
                    flush(w, pending)
            flush(w, pending)
    bar.close()
    return stats
