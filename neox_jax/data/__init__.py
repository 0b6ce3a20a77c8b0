"""Megatron MMIDIDX datasets (GPT-NeoX's and Pythia's training data): read, write, the batch at any Pythia step.

    from neox_jax.data import IndexedDataset, write_indexed, pythia_batch, pythia_items

    ds = IndexedDataset("pile/document")   # PREFIX.idx + PREFIX.bin, or PREFIX-000NN-of-000MM.bin shards as one
    len(ds)          # items
    ds[i]            # item i: [ds.sizes[i]] tokens, a read-only numpy view of the memory-mapped file
    ds.get(i, offset, length)              # part of item i
    ds.span(a, b)    # items [a, b) back to back: one slice of the file
    ds.sizes         # [items] int32     ds.pointers  [items] int64 byte offsets
    ds.doc_idx       # [documents + 1] int64 first item of each document
    ds.dtype, ds.num_tokens, ds.num_documents, ds.nbytes, ds.bin_paths, ds.bin_sizes
    ds.check()       # every pointer against the sizes (opening checks only O(1) things)

    write_indexed("out/mine", [np.array([5, 6, 7]), ...], dtype=np.uint16)   # -> IndexedDataset
    with Writer("out/mine", np.uint16) as w: w.add_item(tokens); w.end_document()   # streaming, crash-safe

    pythia_items(step, batch_size=1024)                   # range of the step's items: [1024 step, 1024 step + 1024)
    pythia_batch(ds, step, batch_size=1024, seq_len=2049)  # [batch, seq_len] tokens of that step (a view)

    from neox_jax.data.hub import open_dataset                # a Hub dataset id, the shards of some items only
    ds = open_dataset("EleutherAI/pile-deduped-pythia-preshuffled", items=pythia_items(1000))

Errors are `neox_jax.data.DataError` (a NeoXError) naming the file, the expected and the found value.
"""

from neox_jax.data.mmap import DTYPES, DataError, IndexedDataset
from neox_jax.data.pythia import BATCH_SIZE, SEQ_LEN, num_steps, pythia_batch, pythia_items
from neox_jax.data.writer import Writer, best_dtype, write_index, write_indexed

__all__ = [
    "BATCH_SIZE",
    "DTYPES",
    "SEQ_LEN",
    "DataError",
    "IndexedDataset",
    "Writer",
    "best_dtype",
    "num_steps",
    "pythia_batch",
    "pythia_items",
    "write_index",
    "write_indexed",
]
