"""The GPT-NeoX-20B tokenizer (HF `tokenizers` JSON): encode / decode, batches, and incremental decoding for streaming.

The 20B tokenizer has 50277 ids; the models' embeddings have more rows (20B: 50432, Pythia: 50304). An id the
tokenizer cannot decode is an error here, never an empty string.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, source: str = "<memory>"):
        self._tok = hf
        self.source = source
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.eos_id = hf.token_to_id(EOS_TOKEN)
        if self.eos_id is None:
            self.eos_id = 0
        pad = hf.token_to_id("<|padding|>")
        self.pad_id = pad if pad is not None else self.eos_id

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """path: a tokenizer.json / 20B_tokenizer.json file, or a directory (checkpoint) holding tokenizer.json."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer file")
        try:
            return cls(_HFTokenizer.from_file(str(path)), str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a HF tokenizers JSON file ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = sorted({i for i in ids if not 0 <= i < self.vocab_size})
        if bad:
            raise ValueError(
                f"token ids {bad[:10]} are outside the tokenizer's vocabulary (0..{self.vocab_size - 1}); "
                f"the model's embedding has padded rows the tokenizer cannot decode"
            )
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(self.check_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save(str(path))


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces, holding back bytes until they form whole UTF-8 characters
    (a multi-byte character can span several byte-level BPE tokens)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(self.tok.check_ids(ids))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        piece, self.emitted = text[len(self.emitted) :], text
        return piece
