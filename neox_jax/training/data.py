"""Text -> packed token windows for fine-tuning, in a deterministic order with a resumable position. Pure numpy.

    files (plain text: one document per file; JSONL: one document per line, its `text` field)
      -> token ids, every document followed by end-of-text                      [n_tokens] int32
      -> windows of seq_len + 1 tokens, stride seq_len (inputs = w[:-1], targets = w[1:], so every token after
         the first is a target exactly once)                                    [n_windows, seq_len + 1]
      -> train / held-out split (the held-out windows are the last ones)
      -> batches: epoch e visits the train windows in the order permutation(seed, e); a Position (epoch, index)
         names the next batch, so a run that saved its Position continues with exactly the batch it would have seen.

The tail that does not fill a whole window is dropped, and `PackedData.dropped_tokens` says how many tokens that was;
so is the last partial batch of an epoch (`Batches.dropped_windows`). Nothing here holds global state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from neox_jax.errors import DataError
from neox_jax.store.tokenizer import Tokenizer


def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Plain text files are one document each; `.jsonl` files hold one JSON object per line with a string `text`."""
    docs: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        if path.suffix.lower() != ".jsonl":
            if not text:
                raise DataError(f"{path}: empty file")
            docs.append(text)
            continue
        n = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
            docs.append(obj["text"])
            n += 1
        if not n:
            raise DataError(f"{path}: no JSON lines")
    return docs


def tokenize(docs: Iterable[str], tokenizer: Tokenizer, vocab_size: int | None = None, chunk: int = 1024) -> np.ndarray:
    """Encodes documents and joins them, each followed by the end-of-text id. Ids must fit the model's embedding."""
    docs = list(docs)
    pieces: list[np.ndarray] = []
    eos = np.asarray([tokenizer.eos_id], np.int32)
    for start in range(0, len(docs), chunk):
        for ids in tokenizer.encode_batch(docs[start : start + chunk]):
            pieces += [np.asarray(ids, np.int32), eos]
    tokens = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.source} produced id {int(tokens.max())}, but the model's vocab_size is "
            f"{vocab_size}: the tokenizer does not belong to this checkpoint"
        )
    return tokens


@dataclasses.dataclass(frozen=True)
class PackedData:
    train: np.ndarray  # [n_train, seq_len + 1] int32
    heldout: np.ndarray  # [n_heldout, seq_len + 1] int32
    num_tokens: int
    dropped_tokens: int  # the tail that did not fill a window


def pack(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """[n] -> windows [(n - 1) // seq_len, seq_len + 1] (stride seq_len, so neighbours share one token) and the
    number of tokens left over."""
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    n = (len(tokens) - 1) // seq_len if len(tokens) > 1 else 0
    if n == 0:
        raise DataError(f"{len(tokens)} tokens are too few for one window of seq_len + 1 = {seq_len + 1} tokens")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # [n, seq_len + 1]
    return tokens[idx].astype(np.int32), len(tokens) - (n * seq_len + 1)


def prepare(
    paths, tokenizer: Tokenizer, seq_len: int, heldout_fraction: float = 0.0, vocab_size: int | None = None
) -> PackedData:
    """Files -> packed windows split into train and held-out (the last ceil(fraction * n) windows)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"held-out fraction must be in [0, 1), got {heldout_fraction}")
    tokens = tokenize(read_documents(paths), tokenizer, vocab_size)
    windows, dropped = pack(tokens, seq_len)
    n_held = int(np.ceil(heldout_fraction * len(windows))) if heldout_fraction > 0 else 0
    if n_held >= len(windows):
        raise DataError(
            f"only {len(windows)} windows of {seq_len + 1} tokens: nothing left for training after a "
            f"held-out split of {heldout_fraction}"
        )
    return PackedData(windows[: len(windows) - n_held], windows[len(windows) - n_held :], len(tokens), dropped)


@dataclasses.dataclass(frozen=True)
class Position:
    """The next batch to take: batch `index` of epoch `epoch`."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d) -> Position:
        return cls(int(d["epoch"]), int(d["index"]))


class Batches:
    """Deterministic batches over fixed windows: epoch e uses permutation(default_rng([seed, e])); drops the last
    partial batch of each epoch."""

    def __init__(self, windows: np.ndarray, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if len(windows) < batch_size:
            raise DataError(
                f"{len(windows)} training windows are fewer than one batch of {batch_size}; use more "
                f"data, a shorter --seq-len or a smaller --batch-size"
            )
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.batches_per_epoch = len(windows) // batch_size
        self.dropped_windows = len(windows) - self.batches_per_epoch * batch_size

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

    def get(self, pos: Position) -> np.ndarray:
        """The batch at pos: [batch_size, seq_len + 1] int32."""
        if not 0 <= pos.index < self.batches_per_epoch:
            raise DataError(f"position {pos} is outside an epoch of {self.batches_per_epoch} batches")
        rows = self.order(pos.epoch)[pos.index * self.batch_size : (pos.index + 1) * self.batch_size]
        return self.windows[rows]

    def advance(self, pos: Position) -> Position:
        if pos.index + 1 < self.batches_per_epoch:
            return Position(pos.epoch, pos.index + 1)
        return Position(pos.epoch + 1, 0)


def eval_batches(windows: np.ndarray, batch_size: int):
    """Every held-out window once, in order: yields ([batch_size, T + 1] windows, [batch_size] weights); the last batch
    repeats its first window with weight 0 to keep one compiled shape (the weights make the padding explicit)."""
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        weights = np.ones((batch_size,), np.float32)
        if len(chunk) < batch_size:
            weights[len(chunk) :] = 0.0
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)])
        yield chunk, weights
