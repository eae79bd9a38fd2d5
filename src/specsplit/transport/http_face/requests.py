"""Request bodies of ``/v1/completions`` and ``/v1/chat/completions`` as pydantic models.

Strict: a number where an integer is expected, a string for a number or a boolean, an
unknown field: each is a 400 naming the field, never a silent conversion or default. The
OpenAI fields this server does not implement are listed in ``UNSUPPORTED`` with the values
that mean "off": a client sending ``"logprobs": null`` is served, ``"logprobs": true`` is
refused with a 400 naming ``logprobs``.

Extensions: ``top_k`` (-1 or 0: off, as in vLLM) and ``min_p``. The sampling bounds mirror
``specsplit.sampling.SamplingParams``, which checks them again.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # stop strings per request, as in the OpenAI API
SEED_LIMIT = 1 << 63

# OpenAI fields this face does not implement, with the values that mean "off"
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
}


def _same(v: Any, off: Any) -> bool:
    return v == off and isinstance(v, bool) == isinstance(off, bool)


def check_unsupported(body: dict[str, Any]) -> dict[str, Any]:
    """The body without the unsupported fields that are off; raises UnsupportedField for one
    that is on."""
    for name, off in UNSUPPORTED.items():
        if name in body and not any(_same(body[name], o) for o in off):
            raise UnsupportedField(name)
    return {k: v for k, v in body.items() if k not in UNSUPPORTED}


class UnsupportedField(ValueError):
    """A known OpenAI field set to a value this server does not implement."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is not supported by this server")
        self.name = name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = Field(
        None, description="also send a last chunk with no choices and the usage (OpenAI's shape)"
    )


class _Common(_Strict):
    """Fields both endpoints share."""

    model: str | None = Field(None, description="must name the served model; unset: that model")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most")
    temperature: float | None = Field(None, ge=0, le=100, description="0: greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus mass; 1: off")
    top_k: int | None = Field(None, ge=-1, description="extension: keep the k likeliest; -1/0: off")
    min_p: float | None = Field(None, ge=0, lt=1, description="extension: drop p < min_p * max p")
    seed: int | None = Field(
        None,
        ge=0,
        lt=SEED_LIMIT,
        description="same seed, same draws: the same text where rounds fall alike (README)",
    )
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    n: int | None = Field(None, description="choices per request: 1 only")
    stream: bool | None = Field(None, description="server-sent events")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and not used")
    metadata: dict[str, str] | None = Field(None, description="accepted and not used")

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(v)}")
        if not (
            v is None
            or isinstance(v, str)
            or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        ):
            raise ValueError(f"must be a string or a list of up to {MAX_STOP} strings")
        return v

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[int] = Field(description="text, or a non-empty list of token ids")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        ok_ids = isinstance(v, list) and v and all(type(t) is int for t in v)
        if not (isinstance(v, str) or ok_ids):
            raise ValueError("must be a string or a non-empty list of token ids")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message: a role and text (a string, null or text parts)."""

    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None
    # what the official client sends back with an assistant message: accepted when empty
    name: Any = None
    refusal: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if not (v is None or isinstance(v, str | list)):
            raise ValueError("must be a string, null or a list of text parts")
        for part in v if isinstance(v, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"only text parts are supported, got type {kind!r}")
        return v

    @field_validator("name", "refusal", "tool_calls", "function_call", "audio", "annotations")
    @classmethod
    def _empty(cls, v: Any) -> None:
        if v not in (None, []):
            raise ValueError("is not supported by this server")
        return None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="new tokens at most")
