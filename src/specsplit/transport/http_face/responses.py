"""Response bodies in OpenAI's shapes (pydantic models) and the builder for one request.

Extension: a ``specsplit`` object next to ``usage`` with the generation statistics
(``GenerationStats.as_dict``: acceptance rate, tau, tokens/s, ...). Streamed pieces carry
``specsplit`` too: ``spans``, the piece's text split by the token each part came from with
that token's origin, and the request's counters so far (see ``Progress``).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from specsplit.engine.metrics import GenerationStats
from specsplit.engine.speculative import GenerationResult

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def _unset(v: object) -> bool:
    return v is None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Span(BaseModel):
    """Part of a streamed piece's text and how the token it belongs to came: "accepted:<drafter>"
    (a draft token the target accepted), "correction", "bonus" or "target" (see
    ``engine.speculative.Chunk``). A token whose text was held back (an incomplete character,
    a possible stop string) may continue in the next piece's first span."""

    text: str
    origin: str | None


class Progress(BaseModel):
    """A streamed piece's extension: its spans and the request's counters so far."""

    spans: list[Span]
    new_tokens: int  # tokens generated so far
    target_passes: int  # verification passes so far (tau = new_tokens / target_passes)
    proposed: int  # draft tokens proposed so far
    accepted: int  # draft tokens accepted so far (acceptance = accepted / proposed)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_unset)
    content: str | None = Field(None, exclude_if=_unset)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None
    logprobs: None = None


class _Envelope(BaseModel):
    id: str
    created: int
    model: str


class Completion(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage
    specsplit: dict[str, Any]


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    specsplit: dict[str, Any]


class CompletionChunk(_Envelope):
    """A streamed event of /v1/completions (OpenAI streams these as ``text_completion``)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_unset)
    specsplit: dict[str, Any] | Progress | None = Field(None, exclude_if=_unset)


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_unset)
    specsplit: dict[str, Any] | Progress | None = Field(None, exclude_if=_unset)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specsplit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def progress(spans: list[Span], stats: GenerationStats | None) -> Progress:
    s = stats or GenerationStats()
    return Progress(
        spans=spans,
        new_tokens=s.new_tokens,
        target_passes=s.target_passes,
        proposed=s.proposed,
        accepted=s.accepted,
    )


class Reply:
    """Builds the response objects of one completion or chat completion."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int) -> None:
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.role_sent = False

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}

    def usage(self, result: GenerationResult) -> Usage:
        n = len(result.token_ids)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=n,
            total_tokens=n + self.prompt_tokens,
        )

    def full(self, result: GenerationResult) -> Completion | ChatCompletion:
        """The whole (non-streamed) response."""
        finish = FINISH_REASONS.get(result.finish_reason, result.finish_reason)
        extras = {"usage": self.usage(result), "specsplit": result.stats.as_dict()}
        if self.chat:
            choice = ChatChoice(message=AssistantMessage(content=result.text), finish_reason=finish)
            return ChatCompletion(**self._head(), choices=[choice], **extras)
        choice = CompletionChoice(text=result.text, finish_reason=finish)
        return Completion(**self._head(), choices=[choice], **extras)

    def piece(
        self,
        text: str,
        finish: str | None = None,
        usage: Usage | None = None,
        specsplit: dict[str, Any] | Progress | None = None,
    ) -> CompletionChunk | ChatCompletionChunk:
        """One streamed event: new text (and the finish reason on the last one)."""
        extras = {"usage": usage, "specsplit": specsplit}
        if not self.chat:
            choice = CompletionChoice(text=text, finish_reason=finish)
            return CompletionChunk(**self._head(), choices=[choice], **extras)
        delta = Delta(role=None if self.role_sent else "assistant", content=text or None)
        self.role_sent = True
        choice = ChatChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(**self._head(), choices=[choice], **extras)

    def last(self, result: GenerationResult) -> CompletionChunk | ChatCompletionChunk:
        """The final streamed event: finish reason, usage and statistics."""
        finish = FINISH_REASONS.get(result.finish_reason, result.finish_reason)
        return self.piece("", finish, self.usage(result), result.stats.as_dict())

    def usage_only(self, result: GenerationResult) -> CompletionChunk | ChatCompletionChunk:
        """With ``stream_options.include_usage``: a last event without choices (OpenAI's)."""
        cls = ChatCompletionChunk if self.chat else CompletionChunk
        return cls(**self._head(), choices=[], usage=self.usage(result))
