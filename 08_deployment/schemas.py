"""Request/response schemas of the OpenAI-compatible API (the subset this server implements) and the error body.

Reference: https://platform.openai.com/docs/api-reference/completions and .../chat . Validation is strict (no string to
int coercion) and closed: a parameter this server does not implement (``logit_bias``, ``tools``, ``echo``, ``suffix``,
a non-zero penalty, ...) is a 400 naming it, never silently ignored. Anything that fails becomes an OpenAI-style
``{"error": {"message", "type", "param", "code"}}`` 4xx.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOKENS_LIMIT = 1 << 20  # schema bound; the real bound is the model's context, checked per request
MAX_N = 128  # schema bound; the real bound is the batch size (choices of one prompt run together), checked per request
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit for chat; completions allow 5)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class SamplingParams(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # an unknown or unimplemented parameter is a 400

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # an end-user id for the caller's logs; nothing to do here
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # {"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}}: checked (400 on a
    # bad one) and enforced by constrained decoding (ch07/constrained.py) in api.py
    response_format: dict | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("presence/frequency penalties are not supported by this server (only 0)")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingParams):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # the drawn token's + this many alternatives
    echo: Literal[False] = False
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        if not prompt or (isinstance(prompt, list) and any(len(p) == 0 for p in prompt if not isinstance(p, int))):
            raise ValueError("prompt must not be empty")
        return prompt

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of (server-side ranking of extra samples) is not supported; use n")
        return self

    def prompt_list(self) -> list[str] | list[list[int]]:
        """Every prompt as its own item: strings, or lists of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A plain play-script chat template ("USER:\\n...\\n\\n"), ending with the assistant's turn header.

    The course's char model was trained on Shakespeare, whose speaker turns look exactly like this, so it continues in
    the assistant's voice; the server stops at the next blank line (the end of the turn) unless ``stop`` is given.
    """
    turns = [f"{m.role.upper()}:\n{m.text().strip()}\n\n" for m in messages]
    return "".join(turns) + "ASSISTANT:\n"


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
