"""Per-prompt bookkeeping on the host: accepted ids, stop ids, stop strings, max length, and the streamed text.

Stop strings are looked for in the generated text only (never the prompt). The completion text ends before the stop
string (as lm-evaluation-harness's generate_until and OpenAI's `stop` do); the ids keep the token that completed it.
While streaming, text is held back while it ends in an incomplete UTF-8 character (a character split across byte-level
BPE tokens) or in what could be the start of a stop string, so nothing streamed is ever taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

from neox_jax.store.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding gives for an incomplete UTF-8 sequence


class RowTracker:
    def __init__(self, tok: Tokenizer | None, stop_ids: Sequence[int], stops: Sequence[str], max_new: int):
        self.tok, self.stop_ids, self.stops, self.max_new = tok, set(stop_ids), list(stops), max_new
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.stopped_by: int | str | None = None
        self.text = ""  # the completion text streamed so far; the whole completion once finished
        self._searched = 0  # characters of generated text already searched for stop strings
        self._longest = max(map(len, self.stops), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _finish(self, reason: str, by=None) -> None:
        self.finish_reason, self.stopped_by = reason, by

    def push(self, new_ids: Sequence[int]) -> tuple[list[int], str | None]:
        """Takes the next ids (ignored once finished); returns the ids accepted and the new text to show."""
        if self.finished:
            return [], "" if self.tok else None
        start = len(self.ids)
        for t in new_ids:
            self.ids.append(int(t))
            if t in self.stop_ids:
                self._finish("stop", int(t))
                break
            if len(self.ids) >= self.max_new:
                self._finish("length")
                break
        if self.tok is None:
            return self.ids[start:], None
        body = self.ids[:-1] if isinstance(self.stopped_by, int) else self.ids
        full = self.tok.decode(body)
        hit = self._find_stop(full)
        if hit is not None:
            at, s = hit
            k = start  # the fewest ids whose text holds the whole stop string
            while len(self.tok.decode(self.ids[:k])) < at + len(s):
                k += 1
            del self.ids[k:]
            self._finish("stop", s)
            full = full[:at]
        shown = full if self.finished else self._holdback(full)
        piece = shown[len(self.text) :]
        self.text = shown
        return self.ids[start:], piece

    def finish_length(self) -> str | None:
        """Ends a row that ran out of new tokens; returns the rest of its text (None without a tokenizer)."""
        if self.finished:
            return "" if self.tok else None
        self._finish("length")
        if self.tok is None:
            return None
        full = self.tok.decode(self.ids)
        piece, self.text = full[len(self.text) :], full
        return piece

    def _find_stop(self, text: str):
        """(index, stop string) of the earliest stop string in text, searching only the part not searched before."""
        if not self.stops:
            return None
        begin = max(0, self._searched - self._longest - 4)  # the tail may have changed (an incomplete character)
        self._searched = len(text)
        hits = [(i, s) for s in self.stops if (i := text.find(s, begin)) >= 0]
        return min(hits) if hits else None

    def _holdback(self, text: str) -> str:
        text = text.rstrip(REPLACEMENT)
        for n in range(min(len(text), self._longest - 1), 0, -1):  # a suffix that may grow into a stop string
            if any(s.startswith(text[-n:]) for s in self.stops):
                return text[:-n]
        return text
