"""HTTP request bodies -> the engine's ``GenerationRequest`` (prompt ids, sampling, limits).

Runs in a worker thread: tokenizing a long prompt or rendering a chat template is CPU work.
"""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import ValidationError

from specsplit.backends.base import Tokenizer
from specsplit.engine.speculative import GenerationRequest
from specsplit.errors import SpecsplitError
from specsplit.sampling import SamplingParams
from specsplit.transport.http_face.config import FaceConfig
from specsplit.transport.http_face.errors import APIError, bad, from_validation
from specsplit.transport.http_face.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    UnsupportedField,
    check_unsupported,
)

Body = TypeVar("Body", CompletionRequest, ChatCompletionRequest)

COMPLETION_DEFAULT_MAX = 16  # OpenAI's default max_tokens for /v1/completions


def parse(raw: bytes, schema: type[Body]) -> Body:
    """A JSON object body validated against schema; 400 naming the field otherwise."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise bad(f"invalid JSON body: {e}") from e
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    try:
        return schema.model_validate(check_unsupported(body))
    except UnsupportedField as e:
        raise bad(str(e), e.name, "unsupported") from e
    except ValidationError as e:
        raise from_validation(e) from e


def check_model(name: str | None, served: str) -> None:
    """A request naming a model this server does not serve is refused (404, as OpenAI)."""
    if name not in (None, "", served):
        raise APIError(
            404,
            f"the model {name!r} is not served here; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


def completion_ids(req: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """``prompt``: text (encoded with special tokens) or token ids within the vocabulary."""
    if isinstance(req.prompt, str):
        return tokenizer.encode(req.prompt, add_special=True)
    v = tokenizer.vocab_size
    if min(req.prompt) < 0 or max(req.prompt) >= v:
        raise bad(f"prompt token ids must be in [0, {v})", "prompt")
    return list(req.prompt)


def chat_ids(req: ChatCompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """Messages -> prompt ids: the model's chat template (which holds its own special
    tokens), or else plain ``role: content`` lines ending with ``assistant:``."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        rendered = tokenizer.apply_chat_template(messages)
    except Exception as e:  # a template rejecting the messages (roles, order) is the client's
        raise bad(f"the chat template rejected the messages: {e}", "messages") from e
    if rendered is not None:
        return tokenizer.encode(rendered, add_special=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer.encode(text, add_special=True)


def _max_tokens(req: CompletionRequest | ChatCompletionRequest, limit: int) -> int:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        name, value = "max_completion_tokens", req.max_completion_tokens
    elif req.max_tokens is not None:
        name, value = "max_tokens", req.max_tokens
    else:  # unset: OpenAI's defaults (16 for completions, as many as allowed for chat)
        return min(COMPLETION_DEFAULT_MAX, limit) if isinstance(req, CompletionRequest) else limit
    if not 1 <= value <= limit:
        raise bad(f"{name} must be in [1, {limit}], got {value}", name)
    return value


def generation_request(
    req: CompletionRequest | ChatCompletionRequest, ids: list[int], config: FaceConfig
) -> GenerationRequest:
    """Check the prompt against the context and build the engine request. Temperature
    defaults to 1, as in OpenAI (0 is greedy)."""
    if not ids:
        raise bad("the prompt is empty", "prompt")
    if len(ids) >= config.n_ctx:
        raise bad(
            f"the prompt has {len(ids)} tokens; the context holds {config.n_ctx}",
            "prompt" if isinstance(req, CompletionRequest) else "messages",
            "context_length_exceeded",
        )
    max_tokens = _max_tokens(req, config.max_tokens_limit)
    try:
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            min_p=0.0 if req.min_p is None else req.min_p,
        )
    except SpecsplitError as e:
        raise bad(str(e)) from e
    return GenerationRequest(ids, max_tokens, params, req.seed, req.stops())
