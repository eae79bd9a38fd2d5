"""The HTTP face with real clients: the official ``openai`` package and ``curl -N``, against
``specsplit serve --target smollm2-135m --http-port ...`` started as a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from conftest import specsplit_serve

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
PROMPT = "The three primary colors are"
CHAT = [{"role": "user", "content": "Name three primary colors."}]


@pytest.fixture(scope="module")
def url(smollm2_converted):
    # no server drafter: its K follows measured times, and a sampled text replays its seed
    # only where the rounds fall alike (README, Known limits)
    args = ("--target", MODEL, "--target-backend", "torch", "--threads", "2", "--draft", "none")
    with specsplit_serve(*args) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat_text(client) -> str:
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    return resp.choices[0].message.content


def test_models_lists_the_target(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat(client, chat_text):
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert resp.object == "chat.completion" and resp.model == MODEL
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.message.content == chat_text
    assert choice.finish_reason == "length" and resp.usage.completion_tokens == 8
    stats = resp.model_extra["specsplit"]  # the extension next to usage
    assert stats["new_tokens"] == 8 and stats["target_passes"] >= 1


def test_chat_stream_equals_the_whole_answer(client, chat_text):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    spans = [
        s
        for c in chunks
        if c.choices
        for s in (c.model_extra.get("specsplit") or {}).get("spans", [])
    ]
    assert "".join(s["text"] for s in spans) == text


def test_completions_whole_streamed_and_stopped(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    text = whole.choices[0].text
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == text
    stop = text.strip().split()[1]  # a word from the middle of the answer
    cut = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("seed", [0, 123])
def test_a_seeded_sampled_request_replays(client, seed):
    def once() -> str:
        resp = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.9, seed=seed
        )
        assert resp.model_extra["specsplit"]["seed"] == seed
        return resp.choices[0].text

    assert once() == once()


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": True}, "logprobs"),
        ({"n": 2}, "n"),
        ({"extra_body": {"top_k": -3}}, "top_k"),
    ],
)
def test_bad_values_are_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, **{"max_tokens": 4, **kwargs})
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_a_model_not_served_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"


def test_extensions_through_extra_body(client):
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, extra_body={"top_k": 1, "min_p": 0.05}
    )
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert resp.choices[0].text == greedy.choices[0].text  # top_k 1 is greedy


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_events_as_they_come(url, client):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    cmd = ["curl", "-sN", url + "/v1/completions", "-H", "Content-Type: application/json"]
    t0 = time.monotonic()
    proc = subprocess.Popen([*cmd, "-d", json.dumps(body)], stdout=subprocess.PIPE, text=True)
    arrivals, events = [], []
    for line in proc.stdout:
        if line.startswith("data: "):
            arrivals.append(time.monotonic() - t0)
            events.append(line[6:].strip())
    assert proc.wait(60) == 0
    assert events[-1] == "[DONE]"
    evs = [json.loads(e) for e in events[:-1]]
    text = "".join(e["choices"][0]["text"] for e in evs)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert text == whole.choices[0].text
    assert evs[-1]["usage"]["completion_tokens"] == 16
    assert arrivals[-1] - arrivals[0] > 0.1  # pieces arrive as they are made, not at the end
