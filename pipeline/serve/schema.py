"""Pydantic models of the OpenAI request and response bodies the server accepts and returns.

In:  JSON bodies of POST /v1/completions and /v1/chat/completions (FastAPI validates them with these
     models; types are strict: "10" is not an integer, true is not a number).
Out: the OpenAPI schema (/docs, /openapi.json), and `validation_error`, which turns pydantic's errors
     into OpenAI's error object {"message", "type", "param", "code"} with HTTP 400 (not FastAPI's 422).
Range checks that depend on the served model (max_tokens limit, vocabulary, unsupported parameters
such as n > 1) stay in openai_api.py. Unknown fields are allowed: clients send many.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.decode.policies import POLICIES
from pipeline.serve.openai_api import ROLES, SEED_RANGE, ApiError

Policy = Literal[POLICIES]  # type: ignore[valid-type]
Role = Literal[ROLES]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Common(_Strict):
    model: str | None = Field(None, description="the served model id (GET /v1/models); default: that one")
    max_tokens: int | None = Field(None, ge=1, description="at most the server's max_tokens_limit")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, description="only 1 is supported")
    stream: bool | None = Field(None, description="server-sent events, one per decoding step")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings of at most 256 characters; the text is "
                                         "cut before them")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="a 64-bit integer")
    user: str | None = None
    policy: Policy | None = Field(None, description="FLUID: decoding policy (default: the export's)")
    gamma: float | None = Field(None, description="FLUID: the policy's confidence or entropy knob")
    max_horizon: int | None = Field(None, ge=1, le=4096, description="FLUID: most tokens per step")
    ignore_eos: bool | None = Field(None, description="FLUID: keep generating past end-of-sequence")


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="a string or a list of token ids (one prompt per request)")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Role
    content: str | list[TextPart]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="takes precedence over max_tokens")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    fluid: dict[str, Any] = Field(description="FLUID: forwards, tokens per forward, timings")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    fluid: dict[str, Any]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    fluid: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


_TYPE_WORDS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content', 'str') → 'messages[0].content' (union member tags dropped)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part.lower() in _TYPE_WORDS or part.startswith(("function-", "literal")):
            break
        else:
            out += f".{part}" if out else part
    return out or None


def validation_error(errors: list[dict]) -> ApiError:
    """OpenAI's 400 error for FastAPI's validation errors (the first one is reported)."""
    e = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    kind, param = str(e.get("type", "")), _param(tuple(e.get("loc", ())))
    if kind == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({e.get('msg')})", None, "invalid_json")
    if kind == "missing":
        return ApiError(400, f"{param} is required", param, "missing_required_parameter")
    if kind.endswith(("_type", "_parsing")) or kind in ("model_attributes_type", "union_tag_invalid"):
        what = param or "the request body"
        return ApiError(400, f"{what}: {e.get('msg', 'wrong type')}", param, "invalid_type")
    return ApiError(400, f"{param or 'request'}: {e.get('msg', 'invalid value')}", param, "invalid_value")
