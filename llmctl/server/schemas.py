"""Request bodies of the OpenAI API (the fields llmctl serves) and the error shape.

Unknown fields are ignored, as OpenAI-compatible servers do, so that every client works;
fields that would change the response in a way this server cannot honour (logit_bias,
tools, ...) are rejected by the app with a 400 that names them.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic_core import PydanticCustomError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


def _lone_surrogate(value: Any) -> str | None:
    """The first string anywhere in a JSON value that is not valid Unicode text (a lone
    surrogate such as "\\ud800", which JSON can escape but UTF-8 cannot encode)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
        return None
    if isinstance(value, dict):
        value = list(value.keys()) + list(value.values())
    if isinstance(value, list):
        for v in value:
            found = _lone_surrogate(v)
            if found is not None:
                return found
    return None


INT64 = 2**63


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        bad = _lone_surrogate(data)
        if bad is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "the request holds text that is not valid Unicode ({where}): a lone UTF-16 surrogate cannot be encoded",
                {"where": ascii(bad[:40])},
            )
        return data

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=16)
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: StrictInt | None = Field(None, ge=-INT64, lt=INT64)  # a 64-bit integer, as OpenAI documents it
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # Not OpenAI's, but the extra sampling fields vLLM and llama.cpp's server take (0 or -1: top_k off).
    top_k: StrictInt | None = Field(None, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0)
    user: str | None = None
    # Accepted only at their "off" values (see UNSUPPORTED).
    logit_bias: Any = None
    tools: Any = None
    functions: Any = None
    best_of: Any = None
    suffix: Any = None


# field -> values that mean "not used"
UNSUPPORTED = {
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class CompletionRequest(_Req):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    # The legacy shape: logprobs is how many alternatives per token (0-20), echo prepends the prompt.
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: StrictStr
    detail: StrictStr | None = None


class ImagePart(BaseModel):
    """OpenAI's image content part: a data: URI (or an http(s) URL where serve.allow_remote_images)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageUrl


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[StrictStr, list[Union[TextPart, ImagePart]], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        return [p.image_url.url for p in self.content if isinstance(p, ImagePart)] if isinstance(self.content, list) else []


class ChatRequest(_Req):
    messages: list[Message] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class ModerationPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: StrictStr | None = None


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # A string, a list of strings, or a list of parts (text only here).
    input: Union[StrictStr, list[StrictStr], list[ModerationPart]]
    model: StrictStr | None = None

    def texts(self) -> list[str]:
        """One text per result: each string, or the text parts joined."""
        if isinstance(self.input, str):
            return [self.input]
        if not self.input:
            raise ApiError(400, "input: give at least one text", param="input")
        if isinstance(self.input[0], str):
            return list(self.input)
        if any(p.type != "text" or p.text is None for p in self.input):
            raise ApiError(400, "input: this server moderates text only; leave out image_url parts", param="input", code="unsupported_input")
        return ["".join(p.text for p in self.input)]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered in the OpenAI shape with this status (and headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers
