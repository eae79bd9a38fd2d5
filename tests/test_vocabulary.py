"""A client that is told only the server's address: it takes the server's target and its
tokenizer (sent once as a vocabulary-only GGUF, then cached), and a draft model of another
vocabulary is refused with the server's model named."""

from __future__ import annotations

import pytest

from conftest import tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.torch_backend import TorchBackend
from specsplit.backends.vocab_file import vocab_path
from specsplit.engine.draft_length import FixedK
from specsplit.engine.speculative import DecodeLoop, GenerationRequest
from specsplit.errors import ConfigError, ModelError
from specsplit.faces.api import EdgeDecoder
from specsplit.proposers.ngram import NGramProposer
from specsplit.transport.client import RemoteVerifier
from specsplit.transport.server import ServerConfig, SpecsplitServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A vocabulary cache of this module's own (the model cache stays the session's)."""
    return tmp_path_factory.mktemp("vocab-cache")


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    from specsplit.backends.llamacpp_backend import LlamaCppBackend

    target = LlamaCppBackend.load("smollm2-135m", n_ctx=1024, threads=1)
    srv = SpecsplitServer(target, "smollm2-135m", ServerConfig(port=0, rate=None, calibrate=False))
    srv.start()
    yield srv
    srv.stop(grace=0)


def test_ngram_client_takes_the_servers_tokenizer(server, cache, monkeypatch):
    from specsplit import registry

    monkeypatch.setattr(registry, "cache_dir", lambda: cache)
    address = f"127.0.0.1:{server.port}"
    verifier = RemoteVerifier([address])
    tok = verifier.tokenizer
    assert tok.fingerprint() == server.target.tokenizer.fingerprint()
    assert vocab_path(tok.fingerprint()).exists()
    sent = server.service.counters.bytes_out
    assert verifier.traffic()[1] > 200_000  # the vocabulary came over the wire (gzipped)
    verifier.shutdown()

    decoder = EdgeDecoder([address], "ngram", k=3, warm_up=False)  # from the cache this time
    assert server.service.counters.bytes_out - sent < 10_000
    prompt = decoder.encode_prompt("Name three colours.")
    assert prompt == server.target.tokenizer.encode(
        server.target.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Name three colours."}]
        ),
        add_special=False,
    )
    res = decoder.engine.generate(GenerationRequest(prompt, 24, seed=1))
    decoder.close()
    # the same client with the server's own tokenizer object in hand: the same rounds, ids
    # and text (llama.cpp's logits depend on the pass shape, so compare like with like)
    own = RemoteVerifier([address], server.target.tokenizer)
    ref = DecodeLoop(own, [NGramProposer()], FixedK(3)).generate(
        GenerationRequest(prompt, 24, seed=1)
    )
    own.shutdown()
    assert res.token_ids == ref.token_ids and res.text == ref.text


def test_draft_of_another_vocabulary_names_the_servers_model(server):
    address = f"127.0.0.1:{server.port}"
    # a registry draft is refused before it is fetched (the Qwen draft is not in the cache)
    with pytest.raises(ModelError, match="server's target smollm2-135m.*--draft ngram"):
        EdgeDecoder([address], "qwen2.5-coder-0.5b-iq4_nl", warm_up=False)
    # a draft model in hand: refused by its vocabulary
    other = TorchBackend(tiny_llama(vocab=300), ByteTokenizer(300))
    with pytest.raises(ModelError, match="server's target smollm2-135m"):
        EdgeDecoder([address], other, warm_up=False)
    # a client that insists on its own tokenizer: the server names its model
    with pytest.raises(ConfigError, match="this server's target smollm2-135m"):
        RemoteVerifier([address], ByteTokenizer(300))


def test_server_without_a_gguf_cannot_send_its_tokenizer():
    tok = ByteTokenizer(300)
    srv = SpecsplitServer(
        TorchBackend(tiny_llama(vocab=300), tok), "tiny", ServerConfig(port=0, calibrate=False)
    )
    srv.start()
    try:
        with pytest.raises(ConfigError, match="did not come from a GGUF"):
            RemoteVerifier([f"127.0.0.1:{srv.port}"])
        v = RemoteVerifier([f"127.0.0.1:{srv.port}"], tok)  # with its tokenizer: fine
        res = DecodeLoop(v, [NGramProposer()]).generate(GenerationRequest([256, 72, 101], 8))
        assert len(res.token_ids) == 8
        v.shutdown()
    finally:
        srv.stop(grace=0)
