"""When to stop and what text to show: EOS, stop strings, max_new_tokens, safe streaming.

Streamed text never splits a UTF-8 character (an incomplete one decodes as U+FFFD and is
held back) and never shows the start of a stop string that may still complete.
"""

from __future__ import annotations

from collections.abc import Sequence

from specsplit.backends.base import Tokenizer

REPLACEMENT = "\ufffd"


class TextStream:
    """Turns the growing list of generated ids into text increments and finds stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.emitted = ""  # text handed out so far
        self.stopped_at: int | None = None  # char index where a stop string begins

    def _held_back(self, text: str) -> int:
        """How many trailing chars may still become a stop string or a whole character."""
        n = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self.stop:
            for m in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:m]):
                    n = max(n, m)
                    break
        return n

    def find_stop(self, ids: Sequence[int]) -> int | None:
        """If the text of ids [n] contains a stop string: the fewest ids whose text contains
        one, which is where decoding one token at a time would have stopped, however the ids
        came in rounds. The text then ends where the first stop string in the text of those
        ids begins (``stopped_at``); the ids returned include the token that completed it."""
        if not self.stop or not self._has_stop(self.tokenizer.decode(ids)):
            return None
        lo, hi = 1, len(ids)  # the shortest prefix of ids whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if self._has_stop(self.tokenizer.decode(ids[:mid])):
                hi = mid
            else:
                lo = mid + 1
        text = self.tokenizer.decode(ids[:lo])
        self.stopped_at = min(text.find(s) for s in self.stop if s in text)
        return lo

    def _has_stop(self, text: str) -> bool:
        return any(s in text for s in self.stop)

    def update(self, ids: Sequence[int], final: bool = False) -> str:
        """New text to show after ids [n] (all generated ids so far)."""
        text = self.tokenizer.decode(ids)
        if self.stopped_at is not None:
            text = text[: self.stopped_at]
        elif not final:
            text = text[: len(text) - self._held_back(text)]
        new = text[len(self.emitted) :]  # byte-level BPE: appending ids never changes earlier text
        self.emitted += new
        return new
