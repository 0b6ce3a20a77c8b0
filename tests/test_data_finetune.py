"""`neox-jax finetune --data PREFIX --start-step N` trains on the dataset's own (Pythia) order from step N: each step
records the sequences it trained on, its first loss is the loss of the base model on exactly Pythia's batch
(computed here independently), and a stopped run resumes with the next sequences."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

from conftest import micro_config
from neox_jax.data import pythia_batch, write_indexed
from neox_jax.errors import NeoXError
from neox_jax.model.neox import forward, init_params
from neox_jax.store import checkpoint
from neox_jax.training import run as train

CFG = micro_config(vocab_size=96, num_hidden_layers=1, max_position_embeddings=32)
MESH = "data=-1"  # the batch split over every device (1 or 8)
T, STEP_ITEMS, B = 16, 8, 8  # sequences of T + 1 tokens; 8 a "Pythia" step; B: an optimizer step is a Pythia step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefix_ft")
    rng = np.random.default_rng(0)
    items = [rng.integers(0, CFG.vocab_size, T + 1).astype(np.uint16) for _ in range(4 * STEP_ITEMS)]
    ds = write_indexed(d / "pre", items, np.uint16)
    # random weights of init_params' structure (eval_shape: no 15 s of initializer compiles)
    shapes = jax.eval_shape(lambda: init_params(CFG, seed=0))
    params = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.1).astype(x.dtype), shapes)
    checkpoint.save_params(d / "base", CFG, params)
    return d, ds, params


def _cfg(d, **kw):
    base = dict(checkpoint=str(d / "base"), data=[str(d / "pre")], out=str(d / "run"), seq_len=T, batch_size=B,
                steps=3, start_step=1, data_step_items=STEP_ITEMS, lr=1e-3, mesh=MESH, save_every=1,
                progress=False)  # fmt: skip
    return train.RunConfig(**{**base, **kw})


def test_trains_on_pythia_order_from_start_step_and_resumes(setup):
    d, ds, params = setup
    assert train.run(_cfg(d, stop_after=1)) == 128 + 15  # SIGTERM after step 1: saved
    assert train.run(_cfg(d, resume=True)) == 0
    rows = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["items"] for r in rows] == [[8, 16], [16, 24], [24, 32]]  # Pythia steps 1, 2, 3
    batch = pythia_batch(ds, 1, STEP_ITEMS, T + 1).astype(np.int32)  # [B, T + 1]
    logits = forward(CFG, params, batch[:, :-1])[0]
    want = float(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean())
    np.testing.assert_allclose(rows[0]["loss"], want, rtol=1e-5)
    saved = json.loads((d / "run" / "run.json").read_text())
    assert (saved["start_step"], saved["data_step_items"]) == (1, STEP_ITEMS)


def test_prefix_errors(setup, tmp_path):
    d, _, _ = setup
    with pytest.raises(
        NeoXError,
        match=r"pre: its sequences hold 17 tokens, so --seq-len must be 16 \(inputs \+ the shifted label\), not 8",
    ):
        train.run(_cfg(d, out=str(tmp_path / "a"), seq_len=8))
    with pytest.raises(NeoXError, match=r"--start-step 4 starts at sequence 32, but the dataset holds 32"):
        train.run(_cfg(d, out=str(tmp_path / "b"), start_step=4))
    with pytest.raises(NeoXError, match=r"--batch-size 3 must divide --data-step-items 8"):
        train.run(_cfg(d, out=str(tmp_path / "c"), batch_size=3))
    half = train.prefix.PrefixBatches(d / "pre", T, 4, start_step=1, step_items=STEP_ITEMS)  # B = 4: half steps
    pos, seen = train.data.Position(), []
    for _ in range(3):
        seen.append(half.items(pos))
        pos = half.advance(pos)
    assert seen == [range(8, 12), range(12, 16), range(16, 20)]  # Pythia step 1 in two halves, then step 2
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(NeoXError, match=r"--start-step needs --data to name one dataset prefix"):
        train.run(dataclasses.replace(_cfg(d, out=str(tmp_path / "e")), data=[str(tmp_path / "t.txt")]))
