"""The HTTP face's settings: limits, auth and concurrency, declared once with their bounds."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FaceConfig(BaseModel):
    """How the OpenAI-style face answers (independent of how the app is served)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    auth_token: str | None = Field(
        None, description="bearer token every path but /health and the page needs (None: open)"
    )
    max_tokens_limit: int = Field(
        4096, ge=1, description="largest max_tokens a request may ask (also the chat default)"
    )
    n_ctx: int = Field(4096, ge=2, description="context length: prompts must be shorter")
    max_body_bytes: int = Field(1 << 20, ge=1, description="larger request bodies get 413")
    body_timeout: float = Field(
        10.0, gt=0, description="seconds for a whole request body to arrive, else 408"
    )
    concurrency: int | None = Field(
        1,
        ge=1,
        description="generations at once, others wait: 1 for an engine that serves one request "
        "at a time (SpeculativeEngine); None: no bound (a batch scheduler's sessions)",
    )
    threads: int = Field(
        64, ge=1, description="worker threads that step generations (each blocks on a round)"
    )
