"""The GPT-NeoX-20B tokenizer (from ../shared/data) and incremental decoding."""

import pytest

from neox_jax.store.tokenizer import IncrementalDecoder, Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return Tokenizer.from_file(tokenizer_file)


def test_known_ids(tok):
    assert tok.vocab_size == 50277
    assert tok.eos_id == 0 and tok.pad_id == 1
    ids = tok.encode("Hello world")
    assert ids == [12092, 1533]  # no BOS added
    assert tok.decode(ids) == "Hello world"


def test_batch_round_trip(tok):
    texts = ["GPT-NeoX-20B", " naïve café ☕", ""]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts


def test_padded_vocab_ids_are_errors(tok):
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        tok.decode([50300])  # a Pythia embedding row (50304) the tokenizer cannot decode


def test_incremental_decoding_holds_partial_utf8(tok):
    text = "tea ☕ and 日本語 done"
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_from_checkpoint_dir_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.from_file(tmp_path)
