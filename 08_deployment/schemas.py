"""Request/response schemas of the OpenAI-compatible API (the subset this server implements) and the error body.

Reference: https://platform.openai.com/docs/api-reference/completions and .../chat . Validation is strict (no string to
int coercion); anything that fails becomes an OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` 4xx.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS_LIMIT = 1 << 20  # schema bound; the real bound is the model's context, checked per request


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingParams(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # unknown OpenAI params (user, logit_bias...) are ignored

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    @field_validator("n")
    @classmethod
    def _only_one(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(SamplingParams):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("exactly one prompt per request is supported")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt must not be empty")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)


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
