"""What the HTTP API accepts and how it refuses: request bodies, and OpenAI's error body.

The requests are OpenAI's (`/v1/completions`), with the project's own sampling knobs top_k and
min_p as extensions (the `openai` client sends them through `extra_body`), plus the playground's
two endpoints. Fields a client may send that this server cannot honour (a suffix, penalties, a
logit bias, best_of) are refused with their name rather than silently ignored; fields it does not
know at all are ignored, as OpenAI's clients grow new ones faster than servers do.

Every refusal is an `APIError`, which the app turns into OpenAI's body,
`{"error": {"message", "type", "param", "code"}}`, with the HTTP status it carries.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_CHOICES = 16  # n: each choice is a whole generation, run alone in its batch
MAX_STOPS = 4  # as OpenAI
MAX_LOGPROBS = 20  # alternatives per token
# Refused unless they hold the value that means "off": this server has nothing that honours them.
UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


class APIError(Exception):
    """A request this server refuses: OpenAI's error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the first model the server loaded


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(Request):
    prompt: str | list[str] = ""  # "" starts a story from <|endoftext|> alone
    max_tokens: int = Field(16, ge=1)  # OpenAI's default
    # 0 decodes greedily, as OpenAI's API does; the knobs are validated by tinylm.generation.sampling's
    # checks (see app.strategy_of), so the server and `tinylm generate` refuse the same values.
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int = 0  # as `tinylm generate --seed`: choice i is drawn with seed + i
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED.items():
                if data.get(name) not in neutral:
                    raise APIError(400, f"{name} is not supported by tinylm serve: leave it out", param=name)
        return data

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise APIError(400, f"stop takes up to {MAX_STOPS} non-empty strings, got {stops!r}", param="stop")
        return stops

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list: give a string, or a list of strings", param="prompt")
        return prompts


class ScoreRequest(Request):
    text: str = Field(min_length=1)
    top: int = Field(5, ge=0, le=MAX_LOGPROBS)  # alternatives listed per token


class AttentionRequest(Request):
    text: str = Field(min_length=1)
    layer: int = Field(0, ge=0)
    head: int = Field(0, ge=0)
