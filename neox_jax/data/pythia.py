"""Pythia's training order: the batch at any step, from the preshuffled Pile (EleutherAI/pile-*-pythia-preshuffled).

The preshuffled dataset stores the training sequences in the order they were consumed: item k is one sequence of
2049 tokens (2048 inputs plus the shifted label; documents joined with end-of-text), and step s trained on items
[1024 s, 1024 s + 1024): 2,097,152 tokens a step (143,000 steps). Checkpoint revision `stepN` is the model after
steps 0 .. N-1, so step N is the first batch it has not seen. The same reader serves any dataset of fixed-length
items (batch_size / seq_len say which).
"""

from __future__ import annotations

import numpy as np

from neox_jax.data.mmap import DataError, IndexedDataset

BATCH_SIZE = 1024  # sequences a step
SEQ_LEN = 2049  # tokens a sequence: 2048 inputs + 1 shifted label
STEPS = 143_000  # Pythia's training run


def pythia_items(step: int, batch_size: int = BATCH_SIZE) -> range:
    """The item indices of step `step`: range(batch_size * step, batch_size * (step + 1))."""
    if step < 0 or batch_size < 1:
        raise DataError(f"step must be >= 0 and batch size >= 1; got step {step}, batch size {batch_size}")
    return range(batch_size * step, batch_size * (step + 1))


def num_steps(ds: IndexedDataset, batch_size: int = BATCH_SIZE) -> int:
    """How many whole steps the dataset holds."""
    return len(ds) // batch_size


def pythia_batch(ds: IndexedDataset, step: int, batch_size: int = BATCH_SIZE, seq_len: int = SEQ_LEN) -> np.ndarray:
    """The tokens of step `step`: [batch_size, seq_len], a read-only view of the memory-mapped file (one slice of
    batch_size * seq_len tokens; a copy only when it straddles two shards). Every item must hold seq_len tokens."""
    items = pythia_items(step, batch_size)
    if items.stop > len(ds):
        raise DataError(
            f"{ds.prefix}: step {step} needs items [{items.start}, {items.stop}), but the dataset holds {len(ds)} "
            f"items (steps 0 .. {num_steps(ds, batch_size) - 1} at batch size {batch_size})"
        )
    sizes = ds.sizes[items.start : items.stop]
    bad = np.flatnonzero(sizes != seq_len)
    if bad.size:
        j = items.start + int(bad[0])
        raise DataError(
            f"{ds.prefix}: item {j} (step {step}) holds {int(ds.sizes[j])} tokens, expected seq_len {seq_len}: "
            f"not a dataset of fixed-length sequences at this --seq-len"
        )
    return ds.span(items.start, items.stop).reshape(batch_size, seq_len)  # [batch, seq_len]
