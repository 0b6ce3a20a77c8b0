"""Fine-tuning / continued training on a Megatron dataset prefix, in the dataset's own (Pythia's) order.

    --data PREFIX --start-step N [--data-step-items 1024]
      run step j (from 0) trains on the sequences [first + j B, first + (j + 1) B) with first = N * 1024 and B the
      --batch-size: at B = 1024, exactly Pythia's step N + j; a smaller B divides each Pythia step into 1024 / B
      consecutive optimizer steps over the same sequences, in the same order.

The position is a training.data.Position (epoch, index), saved in each checkpoint like the text data's, so --resume
continues with the next sequences. An "epoch" is the rest of the dataset from the first sequence.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from neox_jax.data import IndexedDataset, pythia_batch
from neox_jax.errors import DataError
from neox_jax.training.data import Position


def is_prefix(paths: list) -> bool:
    """True when --data names one Megatron dataset (PATH.idx beside it) rather than text files."""
    if len(paths) != 1:
        return False
    p = str(paths[0])
    return Path(p + ".idx").is_file() or (p.endswith((".idx", ".bin")) and Path(p[:-4] + ".idx").is_file())


class PrefixBatches:
    """Batches [batch_size, seq_len + 1] int32 of a fixed-length dataset from a Pythia step on (module docstring)."""

    def __init__(
        self,
        prefix: str | os.PathLike,
        seq_len: int,
        batch_size: int,
        start_step: int = 0,
        step_items: int = 1024,
        vocab_size: int | None = None,
    ):
        if batch_size < 1 or step_items % batch_size:
            raise DataError(
                f"--batch-size {batch_size} must divide --data-step-items {step_items} (the sequences of one Pythia "
                f"step), so the run walks whole steps in their order"
            )
        if start_step < 0:
            raise DataError(f"--start-step must be >= 0, got {start_step}")
        self.ds = IndexedDataset(prefix)
        self.seq_len, self.batch_size, self.vocab_size = seq_len, batch_size, vocab_size
        self.first = start_step * step_items
        self.batches_per_epoch = max(len(self.ds) - self.first, 0) // batch_size
        self.dropped_windows = max(len(self.ds) - self.first, 0) % batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{self.ds.prefix}: --start-step {start_step} starts at sequence {self.first}, but the dataset holds "
                f"{len(self.ds)} (fewer than one batch of {batch_size} from there)"
            )
        if len(self.ds) and int(self.ds.sizes[self.first]) != seq_len + 1:
            raise DataError(
                f"{self.ds.prefix}: its sequences hold {int(self.ds.sizes[self.first])} tokens, so --seq-len must be "
                f"{int(self.ds.sizes[self.first]) - 1} (inputs + the shifted label), not {seq_len}"
            )

    def items(self, pos: Position) -> range:
        """The dataset items the batch at pos is made of."""
        start = self.first + pos.index * self.batch_size
        return range(start, start + self.batch_size)

    def get(self, pos: Position) -> np.ndarray:
        """[batch_size, seq_len + 1] int32: the sequences at pos."""
        if not 0 <= pos.index < self.batches_per_epoch:
            raise DataError(f"position {pos} is outside the {self.batches_per_epoch} batches from the start step")
        step = self.items(pos).start // self.batch_size
        batch = pythia_batch(self.ds, step, self.batch_size, self.seq_len + 1)
        if self.vocab_size is not None and batch.size and int(batch.max()) >= self.vocab_size:
            row = int(np.argmax(batch.max(-1)))
            raise DataError(
                f"{self.ds.prefix}: item {self.items(pos)[row]} holds token {int(batch.max())}, but the model's "
                f"vocab_size is {self.vocab_size}: the dataset was tokenized for another model"
            )
        return batch.astype(np.int32)

    def advance(self, pos: Position) -> Position:
        if pos.index + 1 < self.batches_per_epoch:
            return Position(pos.epoch, pos.index + 1)
        return Position(pos.epoch + 1, 0)


def run_data(cfg, vocab_size: int, heldout_fraction: float):
    """The batches a fine-tuning run (training.run.RunConfig) trains on, its held-out windows (or None) and a line
    saying what they are: from a dataset prefix (this module) or from text files (training.data)."""
    from neox_jax.store.tokenizer import Tokenizer
    from neox_jax.training import data

    if is_prefix(cfg.data):
        if cfg.eval_every:
            raise DataError("--eval-every: held-out evaluation is for text --data; a dataset prefix trains in order")
        b = PrefixBatches(
            cfg.data[0], cfg.seq_len, cfg.batch_size, cfg.start_step or 0, cfg.data_step_items, vocab_size
        )
        what = (
            f"{b.ds.prefix}: {len(b.ds):,} sequences of {cfg.seq_len + 1} tokens, from step {cfg.start_step or 0} "
            f"(sequence {b.first:,}; {cfg.data_step_items} a step)"
        )
        return b, None, what
    if cfg.start_step is not None:
        raise DataError(f"--start-step needs --data to name one dataset prefix (PREFIX.idx); got {cfg.data}")
    tok = Tokenizer.from_file(cfg.tokenizer or cfg.checkpoint)
    packed = data.prepare(cfg.data, tok, cfg.seq_len, heldout_fraction, vocab_size)
    batches = data.Batches(packed.train, cfg.batch_size, cfg.seed)
    what = (
        f"{packed.num_tokens:,} tokens -> {len(packed.train)} windows of {cfg.seq_len + 1} (+{len(packed.heldout)} "
        f"held out; {packed.dropped_tokens} tail tokens dropped)"
    )
    return batches, packed.heldout, what
