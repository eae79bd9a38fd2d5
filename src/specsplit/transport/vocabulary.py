"""The server's tokenizer for a client with no model of its own (an n-gram drafter, a
client told only the server's address): fetched once with the Vocabulary call, then kept in
the cache by its fingerprint (``backends.vocab_file``) and in this process."""

from __future__ import annotations

import threading

import grpc

from specsplit.backends.base import Tokenizer
from specsplit.backends.vocab_file import load_vocab, save_vocab_blob
from specsplit.transport import wire
from specsplit.transport.link import Link, error_of
from specsplit.transport.pb import specsplit_pb2 as pb

_loaded: dict[str, Tokenizer] = {}  # fingerprint -> tokenizer, in this process
_lock = threading.Lock()


def server_tokenizer(link: Link, timeout: float = 300.0) -> Tokenizer:
    """The tokenizer of the server behind link (its Welcome names the fingerprint)."""
    fingerprint = link.welcome.tokenizer_fingerprint
    with _lock:
        tok = _loaded.get(fingerprint) or load_vocab(fingerprint)
        if tok is None:
            request = pb.VocabularyRequest(tokenizer_fingerprint=fingerprint)
            link.bytes_out += request.ByteSize() + wire.GRPC_FRAME
            parts = []
            try:
                for chunk in link.stub.Vocabulary(request, metadata=link.metadata, timeout=timeout):
                    link.bytes_in += chunk.ByteSize() + wire.GRPC_FRAME
                    parts.append(chunk.data)
            except grpc.RpcError as e:
                raise error_of(e) from None
            save_vocab_blob(b"".join(parts), fingerprint)
            tok = load_vocab(fingerprint)
            assert tok is not None
        _loaded[fingerprint] = tok
        return tok
