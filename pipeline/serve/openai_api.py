"""OpenAI-compatible protocol of the FLUID server: request validation and response shapes (pure, no Ray).

In:  the decoded JSON body of POST /v1/completions or /v1/chat/completions and the served `Limits`
     (model name, max_tokens limit, vocabulary size).
Out: a `Parsed` request (→ `GenerationRequest` once the prompt is tokenized) or an `ApiError` that
     carries the HTTP status and the OpenAI error JSON
     {"error": {"message", "type": "invalid_request_error", "param": <field>, "code"}};
     response dicts and SSE lines built from sampler results (`usage` plus our `fluid` stats object).
Extensions accepted in requests: `policy`, `gamma`, `max_horizon` (the sampler's knobs, docs/method.md §7)
and `ignore_eos`. Unknown fields are ignored (clients send many); unsupported ones (n > 1, echo,
logprobs, best_of > 1, suffix, logit_bias, penalties ≠ 0, tools) are refused by name.
The API key check lives in auth.py.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline.decode.policies import POLICIES, GenerationRequest
from pipeline.decode.stops import stop_problem

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
ROLES = ("system", "developer", "user", "assistant", "tool")
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit integer, as OpenAI's API; torch's generator takes no more
DONE = b"data: [DONE]\n\n"
# Used when a tokenizer has no chat template (base models): "role: content" lines, then "assistant:".
FALLBACK_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:{% endif %}")


class ApiError(Exception):
    """An HTTP error in the OpenAI format; `param` names the offending request field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    model: str  # the served model id; requests naming another model get 404
    max_tokens_limit: int = 1024
    vocab_size: int | None = None
    mask_token_id: int | None = None
    default_max_tokens: int = 256  # chat requests without max_tokens (completions: 16, as OpenAI)


@dataclass
class Parsed:
    """A validated request; the prompt is tokenized later (chat template, context check)."""

    kind: str  # "completion" | "chat"
    model: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None  # None: the server's default_max_tokens
    stream: bool = False
    include_usage: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # GenerationRequest keyword arguments

    def request(self, prompt_ids: list[int], default_max_tokens: int) -> GenerationRequest:
        mt = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return GenerationRequest(prompt_ids=list(prompt_ids), max_tokens=mt, **self.options)


def bad(param: str | None, message: str, code: str = "invalid_value", status: int = 400) -> ApiError:
    return ApiError(status, message, param, code)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(None, f"the request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_type")
    return body


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(body: dict, key: str, default, lo: float, hi: float, *, lo_open: bool = False):
    x = body.get(key)
    if x is None:
        return default
    if not _is_num(x):
        raise bad(key, f"{key} must be a number, got {json.dumps(x)[:40]}", "invalid_type")
    if x > hi or x < lo or (lo_open and x == lo):
        raise bad(key, f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {x}")
    return float(x)


def _int(body: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    x = body.get(key)
    if x is None:
        return None
    if not _is_int(x):
        raise bad(key, f"{key} must be an integer, got {json.dumps(x)[:40]}", "invalid_type")
    if x < lo or (hi is not None and x > hi):
        raise bad(key, f"{key} must be an integer in [{lo}, {hi if hi is not None else '∞'}], got {x}")
    return x


def _bool(body: dict, key: str, default: bool = False) -> bool:
    x = body.get(key)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise bad(key, f"{key} must be true or false, got {json.dumps(x)[:40]}", "invalid_type")
    return x


def _common(body: dict, limits: Limits, kind: str) -> Parsed:
    model = body.get("model", limits.model)
    if not isinstance(model, str):
        raise bad("model", "model must be a string", "invalid_type")
    if model != limits.model:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {limits.model!r}",
                       "model", "model_not_found")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad("n", f"only n = 1 is supported, got {json.dumps(n)[:40]}", "unsupported_value")
    unsupported = {"best_of": lambda v: v in (None, 1), "echo": lambda v: v in (None, False),
                   "logprobs": lambda v: v in (None, False), "top_logprobs": lambda v: v in (None, 0),
                   "suffix": lambda v: v in (None, ""), "logit_bias": lambda v: v in (None, {}),
                   "presence_penalty": lambda v: v in (None, 0), "frequency_penalty": lambda v: v in (None, 0),
                   "tools": lambda v: v in (None, []), "response_format": lambda v: v in (None, {"type": "text"})}
    for key, ok in unsupported.items():
        if not ok(body.get(key)):
            raise bad(key, f"{key} is not supported by this server", "unsupported_parameter")
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        key = "max_completion_tokens"
    else:
        key = "max_tokens"
    max_tokens = _int(body, key, 1)
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise bad(key, f"{key} must be at most {limits.max_tokens_limit}, got {max_tokens}")
    if max_tokens is None and kind == "completion":
        max_tokens = min(16, limits.max_tokens_limit)  # the OpenAI default for completions
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options", "stream_options must be an object", "invalid_type")
    include_usage = _bool(so or {}, "include_usage") if stream else False
    opts: dict[str, Any] = {
        "temperature": _num(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "stop_on_eos": not _bool(body, "ignore_eos"),
    }
    opts["seed"] = _int(body, "seed", *SEED_RANGE)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    problem = stop_problem(stop)
    if problem:
        raise bad("stop", problem)
    opts["stop"] = stop
    policy = body.get("policy")
    if policy is not None and policy not in POLICIES:
        raise bad("policy", f"unknown policy {json.dumps(policy)[:40]}; choose one of {', '.join(POLICIES)}")
    opts["policy"] = policy
    opts["gamma"] = _num(body, "gamma", None, -1e6, 1e6)
    opts["max_horizon"] = _int(body, "max_horizon", 1, 4096)
    return Parsed(kind, model, max_tokens=max_tokens, stream=stream, include_usage=include_usage, options=opts)


def parse_completion(body: dict, limits: Limits) -> Parsed:
    p = _common(body, limits, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "the prompt is empty")
        p.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        vocab = limits.vocab_size
        if any(t < 0 or (vocab is not None and t >= vocab) for t in prompt):
            raise bad("prompt", f"token ids in the prompt must be in [0, {vocab})")
        p.prompt_ids = list(prompt)
    elif prompt is None:
        raise bad("prompt", "prompt is required", "missing_required_parameter")
    elif isinstance(prompt, list) and not prompt:
        raise bad("prompt", "the prompt is empty")
    elif isinstance(prompt, list) and all(isinstance(x, (str, list)) for x in prompt):
        raise bad("prompt", "only one prompt per request is supported (send several requests)", "unsupported_value")
    else:
        raise bad("prompt", "prompt must be a string or a list of token ids", "invalid_type")
    return p


def parse_chat(body: dict, limits: Limits) -> Parsed:
    p = _common(body, limits, "chat")
    msgs = body.get("messages")
    if msgs is None:
        raise bad("messages", "messages is required", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects",
                  "invalid_type" if not isinstance(msgs, list) else "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object", "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}")
        if isinstance(content, list):  # content parts: text only
            if any(not isinstance(c, dict) or c.get("type") != "text" or not isinstance(c.get("text"), str)
                   for c in content):
                raise bad(f"{where}.content", "only text content parts are supported", "unsupported_value")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"{where}.content must be a string", "invalid_type")
        out.append({"role": role, "content": content})
    if not any(m["content"] for m in out):
        raise bad("messages", "all messages are empty")
    p.messages = out
    return p


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for chat `messages` via the tokenizer's chat template (a plain fallback without one).
    Control tokens inside message contents are encoded as text (no role injection)."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    try:
        enc = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                            tokenize=True, return_dict=True, sanitize_control_tokens=True)
    except Exception as e:  # templates raise on e.g. unsupported role orders
        raise bad("messages", f"the chat template rejected the messages: {str(e)[:200]}") from None
    return list(enc["input_ids"])


def check_prompt(ids: list[int], *, param: str, context: int | None, mask_token_id: int | None) -> None:
    if not ids:
        raise bad(param, "the prompt is empty after tokenization")
    if context is not None and len(ids) >= context:
        raise bad(param, f"the prompt has {len(ids)} tokens but the model context is {context} tokens: "
                  "shorten it", "context_length_exceeded")
    if mask_token_id is not None and mask_token_id in ids:
        raise bad(param, "the prompt contains the sampler's mask token")


# ---------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def fluid_stats(stats, **extra) -> dict:
    """Our extension object: forwards, tokens per forward, mask tokens fed, timings."""
    tpf = stats.tokens / stats.forwards if stats.forwards else 0.0
    return {"policy": stats.policy, "forwards": stats.forwards, "tokens": stats.tokens,
            "tokens_per_forward": round(tpf, 4), "mask_tokens": stats.mask_tokens,
            "decode_time_s": round(stats.wall_time_s, 4), **extra}


def response(kind: str, rid: str, model: str, result, fluid: dict) -> dict:
    finish = FINISH.get(result.finish_reason, result.finish_reason)
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(result.prompt_tokens, len(result.token_ids)), "fluid": fluid}


def chunk(kind: str, rid: str, model: str, text: str | None, finish: str | None = None, *,
          role: bool = False, **extra) -> dict:
    """One SSE chunk; `extra` (e.g. usage, fluid) is added at the top level."""
    finish = FINISH.get(finish, finish) if finish else None
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices, **extra}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
