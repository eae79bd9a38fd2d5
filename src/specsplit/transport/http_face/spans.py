"""Streamed text split by the token each part came from, with that token's origin.

The engine streams text in pieces that need not end on token boundaries (it holds back an
incomplete UTF-8 character or the start of a possible stop string) and tells, per token, how
it came (``Chunk.origins``). ``TokenSpans`` keeps the character offset where each token's
text ends and cuts every piece at those offsets, so the spans of a piece always join to
exactly the piece's text.

A token's text is the difference between decoding the ids up to it and up to the one
before, both from a few tokens back (decoding stays cheap however long the output). Bytes
of a character split over several tokens count for the token that completes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from specsplit.backends.base import Tokenizer

REPLACEMENT = "\ufffd"
ANCHOR = 4  # decode from this many tokens back: enough for any tokenizer's joins


class TokenSpans:
    """Splits one request's streamed text by token; origins as in ``Chunk.origins``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.origins: list[str | None] = []
        self.ends: list[int] = []  # [n_tokens] char offset where each token's text ends
        self.pos = 0  # chars of streamed text split so far
        self.cur = 0  # the token holding char self.pos

    def add(self, ids: Sequence[int], origins: Sequence[str]) -> None:
        """Tokens just generated (origins parallel to ids; missing ones are None)."""
        for i, t in enumerate(ids):
            j = len(self.ids)
            self.ids.append(int(t))
            self.origins.append(origins[i] if i < len(origins) else None)
            a = max(0, j - ANCHOR)
            before = self.tokenizer.decode(self.ids[a:j]).rstrip(REPLACEMENT) if j > a else ""
            upto = self.tokenizer.decode(self.ids[a : j + 1]).rstrip(REPLACEMENT)
            n = len(upto) - len(before) if upto.startswith(before) else len(upto)
            start = max(self.ends[-1] if self.ends else 0, self.pos)  # (after any overflow)
            self.ends.append(start + max(0, n))

    def split(self, text: str) -> list[tuple[str, str | None]]:
        """The next streamed piece as (text, origin) spans, one per token it touches; text
        past the last token's end (which a tokenizer may produce) goes to the last token."""
        out: list[tuple[str, str | None]] = []
        i = 0
        while i < len(text):
            while self.cur < len(self.ends) - 1 and self.ends[self.cur] <= self.pos:
                self.cur += 1
            known = self.cur < len(self.ends) and self.ends[self.cur] > self.pos
            n = min(self.ends[self.cur] - self.pos, len(text) - i) if known else len(text) - i
            origin = self.origins[self.cur] if self.cur < len(self.origins) else None
            out.append((text[i : i + n], origin))
            i += n
            self.pos += n
        return out
