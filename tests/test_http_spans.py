"""Streamed text split by token origin (``http_face.spans``), on hand-built tokenizers: the
spans of every piece join to the piece, and each part belongs to the token that made it."""

from __future__ import annotations

from collections.abc import Sequence

from specsplit.backends.base import Tokenizer
from specsplit.engine.stopping import TextStream
from specsplit.transport.http_face.spans import TokenSpans


class BytesTokenizer(Tokenizer):
    """Each id is a fixed byte string (ids 0..): multi-character tokens and a character
    split over two tokens, decoded as UTF-8 with U+FFFD for incomplete bytes."""

    PIECES = [b"Hel", b"lo", b" w", b"or", b"ld", b"\xc3", b"\xa9", b"!", b" ", b"caf"]

    vocab_size = len(PIECES)
    bos_token_id = None
    eos_token_ids = frozenset()

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages):
        return None

    def fingerprint(self) -> str:
        return "bytes"


def stream(ids: list[int], origins: list[str], rounds: list[int], stop=()) -> list[list]:
    """Feed ids in rounds through the engine's TextStream and TokenSpans, like a stream."""
    tok = BytesTokenizer()
    text, spans = TextStream(tok, stop), TokenSpans(tok)
    out, pieces, i = [], [], 0
    for n in rounds:
        new, new_origins = ids[i : i + n], origins[i : i + n]
        i += n
        out += new
        cut = text.find_stop(out)
        final = i == len(ids) or cut is not None
        if cut is not None:
            keep = max(0, len(new) - (len(out) - cut))
            new, new_origins, out = new[:keep], new_origins[:keep], out[:cut]
        piece = text.update(out, final=final)
        spans.add(new, new_origins)
        parts = spans.split(piece)
        assert "".join(t for t, _ in parts) == piece
        pieces.append(parts)
        if final:
            break
    return pieces


def test_multi_character_tokens_keep_their_origin():
    ids = [0, 1, 2, 3, 4]  # "Hel" "lo" " w" "or" "ld"
    origins = ["target", "accepted:ngram", "accepted:ngram", "correction", "bonus"]
    pieces = stream(ids, origins, [1, 3, 1])
    assert [p for piece in pieces for p in piece] == [
        ("Hel", "target"),
        ("lo", "accepted:ngram"),
        (" w", "accepted:ngram"),
        ("or", "correction"),
        ("ld", "bonus"),
    ]


def test_a_character_split_over_two_tokens_goes_with_the_token_that_completes_it():
    ids = [9, 5, 6, 7]  # "caf" + "\xc3" + "\xa9" (é) + "!"
    origins = ["target", "accepted:a", "correction", "bonus"]
    pieces = stream(ids, origins, [2, 1, 1])
    assert pieces[0] == [("caf", "target")]  # the half character is held back
    assert pieces[1] == [("é", "correction")]
    assert pieces[2] == [("!", "bonus")]


def test_text_held_back_for_a_stop_string_keeps_its_origin_in_the_next_piece():
    ids = [0, 1, 8, 2, 3, 4]  # "Hel" "lo" " " " w" "or" "ld"
    origins = ["target", "bonus", "accepted:x", "accepted:x", "correction", "bonus"]
    pieces = stream(ids, origins, [2, 2, 2], stop=(" wx",))
    joined = [p for piece in pieces for p in piece]
    assert "".join(t for t, _ in joined) == "Hello  world"
    # after round 2 the text ends with " w", which may start " wx": held back, then sent in
    # the next piece with the origin of the token it came from
    assert pieces[1] == [(" ", "accepted:x")]
    assert pieces[2] == [(" w", "accepted:x"), ("or", "correction"), ("ld", "bonus")]


def test_a_stop_string_cuts_the_last_spans():
    ids = [0, 1, 2, 3, 4]
    origins = ["target", "target", "accepted:x", "accepted:x", "bonus"]
    pieces = stream(ids, origins, [5], stop=("wor",))
    assert pieces == [[("Hel", "target"), ("lo", "target"), (" ", "accepted:x")]]


def test_chunks_without_origins_have_none():
    spans = TokenSpans(BytesTokenizer())
    spans.add([0, 1], [])
    assert spans.split("Hello") == [("Hel", None), ("lo", None)]
