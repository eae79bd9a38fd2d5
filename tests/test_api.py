"""The Python API and the engine's stopping rules, end to end on a tiny model."""

from __future__ import annotations

import pytest

from conftest import perturbed, tiny_llama
from specsplit.backends.byte_tokenizer import ByteTokenizer
from specsplit.backends.torch_backend import TorchBackend
from specsplit.errors import ConfigError, ModelError
from specsplit.faces.api import SpeculativeDecoder
from specsplit.proposers.draft_model import DraftModelProposer


@pytest.fixture(scope="module")
def decoder():
    tok = ByteTokenizer(300)
    model = tiny_llama(vocab=300, seed=0)
    target = TorchBackend(model, tok)
    draft = DraftModelProposer(TorchBackend(perturbed(model, 0.08, seed=1), tok))
    return SpeculativeDecoder(target, draft, k=4, warm_up=False)


def test_stream_pieces_add_up_to_the_result(decoder):
    chunks = list(decoder.stream("Hello", max_new_tokens=40))
    result = chunks[-1].result
    assert result is not None and all(c.result is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == result.text
    assert sum(len(c.token_ids) for c in chunks) == len(result.token_ids) == 40
    assert result.finish_reason == "length"


def test_generate_equals_target_alone(decoder):
    alone = SpeculativeDecoder(decoder.target, "none", warm_up=False)
    assert (
        decoder.generate("Hello", max_new_tokens=30).token_ids
        == alone.generate("Hello", max_new_tokens=30).token_ids
    )


def test_stop_string_ends_text_before_it(decoder):
    full = decoder.generate("Hello", max_new_tokens=40)
    text = full.text
    stop = next(text[i : i + 2] for i in range(8, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    res = decoder.generate("Hello", max_new_tokens=40, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == text[: text.index(stop)]
    assert stop in ByteTokenizer(300).decode(res.token_ids)  # ids run up to the stop string
    assert res.token_ids == full.token_ids[: len(res.token_ids)]


def test_never_more_than_max_new_tokens(decoder):
    for n in (1, 2, 5, 13):
        assert len(decoder.generate("Hi", max_new_tokens=n).token_ids) == n


def test_bad_requests_are_config_errors(decoder):
    with pytest.raises(ConfigError):
        decoder.generate("Hi", max_new_tokens=0)
    with pytest.raises(ConfigError):
        decoder.generate("Hi", temperature=-0.5)
    with pytest.raises(ConfigError):
        decoder.generate("x" * 2000)  # longer than the tiny model's 1024 positions


def test_chat_messages_need_a_template(decoder):
    with pytest.raises(ModelError):
        decoder.generate([{"role": "user", "content": "hi"}])
