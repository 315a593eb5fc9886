"""OpenAI-compatible request models and the OpenAI-style error object.

Types are strict (no "5" for 5, no true for 1.0), floats must be finite, and the
checks that need the tokenizer (context window, empty prompt) live in the app.
Unknown fields are ignored, as OpenAI-compatible servers usually do; fields whose
non-default values paratree cannot honour (n > 1, penalties, logprobs, echo) are
rejected rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

MAX_STOP = 16
MAX_STOP_CHARS = 1000

Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Finite, Field(ge=0.0)] | None = None
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[Finite, Field(ge=0.0, lt=1.0)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Finite = 0.0
    frequency_penalty: Finite = 0.0
    user: StrictStr | None = None
    timeout: Annotated[Finite, Field(gt=0.0)] | None = None  # paratree extension: seconds, capped by the server's

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError("only n=1 is supported")
        if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
            raise ValueError("presence_penalty / frequency_penalty are not supported (lossless decoding)")
        for s in self.stop_list():
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop strings must have 1..{MAX_STOP_CHARS} characters")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None

    @model_validator(mode="after")
    def _chat(self):
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)] | \
        Annotated[list[StrictInt], Field(min_length=1)]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _completion(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def validation_error(e: ValidationError) -> ApiError:
    """The first pydantic error as an OpenAI-style 400."""
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith(("function-after", "constrained-"))]
    # drop pydantic's union-branch tags (e.g. 'str', 'list[str]') from the parameter path
    loc = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    kind = err.get("type", "")
    code = "missing_required_parameter" if kind == "missing" else "invalid_value"
    text = f"{param}: {msg}" if param else msg
    return ApiError(400, text, param=param, code=code)
