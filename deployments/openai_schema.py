"""OpenAI wire format: request models, response and stream-chunk bodies, and the error body.

Requests follow OpenAI's leniency rules: unknown fields are ignored, invalid values are a 400.
Fields OpenAI defines but graphserve does not implement (logprobs, echo, best_of, suffix,
logit_bias, penalties) are accepted at their neutral value and rejected with a 400 otherwise, so a
client never silently gets something other than what it asked for. Extensions (vLLM's names):
`top_k` (-1 or 0 disables it) and `ignore_eos`.

Pure pydantic and dicts: no Ray, no FastAPI, no tokenizer.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from deployments.protocol import Completion, StreamChunk, Usage

PromptField = Union[str, list[str], list[int], list[list[int]]]


def reject_unless_neutral(v, info: ValidationInfo):
    """A field OpenAI defines that graphserve does not implement: only its neutral value passes
    (falsy; `best_of` may also be 1)."""
    if v and not (info.field_name == "best_of" and v == 1):
        raise ValueError(f"{info.field_name} is not supported")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, float]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Optional[str] = None
    ignore_eos: bool = False   # extension (vLLM's): generate max_tokens even past EOS

    _unsupported = field_validator("logit_bias", "presence_penalty", "frequency_penalty")(reject_unless_neutral)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > 4:  # OpenAI's limit
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(v)}")
        return v

    def params_kwargs(self, max_tokens: Optional[int]) -> dict[str, Any]:
        """The SamplingParams fields of this request (None max_tokens: the frontend's default)."""
        stop = () if self.stop is None else ((self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        return dict(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=max(self.top_k, 0), seed=self.seed, stop=stop, ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: PromptField
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    _unsupported_here = field_validator("logprobs", "echo", "best_of", "suffix")(reject_unless_neutral)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v


    def prompt_list(self) -> list[Union[str, list[int]]]:
        """The prompt field as a list of prompts: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None

    _unsupported_here = field_validator("logprobs")(reject_unless_neutral)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


# ---- responses ----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_body(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def completion_body(rid: str, model: str, completions: Sequence[Completion], usage: Usage) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": None,
                         "finish_reason": c.finish_reason} for c in completions],
            "usage": usage_body(usage)}


def chat_body(rid: str, model: str, completions: Sequence[Completion], usage: Usage) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None, "finish_reason": c.finish_reason} for c in completions],
            "usage": usage_body(usage)}


def completion_chunk(rid: str, model: str, created: int, c: StreamChunk) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": None,
                         "finish_reason": c.finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict,
               finish_reason: Optional[str] = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, usage: Usage) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage_body(usage)}


def models_body(model: str, max_seq_len: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                        "owned_by": "graphserve", "max_model_len": max_seq_len}]}


def sse(obj: Any) -> str:
    """One server-sent event; `sse("[DONE]")` ends a stream."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n"


# ---- errors -------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "server_error", 500: "server_error"}


def error_body(status: int, message: str, param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def validation_error_body(errors: Sequence[dict]) -> dict:
    """A 400 body from pydantic/FastAPI validation errors: the first error, its field as `param`."""
    if not errors:
        return error_body(400, "invalid request")
    err = errors[0]
    # Union members add their type to the location (('body', 'prompt', 'list[int]', 0)): drop it.
    path = [str(x) for x in err.get("loc", ())
            if x != "body" and not (isinstance(x, str) and _is_type_tag(x))]
    param = ".".join(path) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    message = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return error_body(400, message, param=param, code="invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part: str) -> bool:
    return part in _TYPE_TAGS or "[" in part or part.startswith("function-")
