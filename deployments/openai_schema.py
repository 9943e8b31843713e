"""OpenAI request models for /v1/completions and /v1/chat/completions (the HTTP boundary).

Contract (the field-by-field table is `deployments.openai_fields`, also docs/openai-fields.md):
- every field is honoured or refused: refused fields pass only at their neutral values, unknown
  fields are refused (`extra="forbid"`), and each failure is a pydantic error located at the field,
  which the HTTP layer turns into a 400 with that field as `param`;
- `null` is the default wherever OpenAI documents the field as nullable;
- types are strict: a boolean is not an integer or a number, a number is not a string, NaN and
  infinities are refused; strings must be valid Unicode (no lone surrogates);
- `params_kwargs()` returns the `replica.SamplingParams` fields of the request; checks that span
  two fields happen there and raise `InvalidRequestError(param=...)`; ranges the engine knows best
  (logit_bias entries, stop_token_ids) are checked again by `SamplingParams`.

Pure pydantic: no Ray, no FastAPI, no tokenizer.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat,
                      StrictInt, StrictStr, ValidationInfo, create_model, field_validator)

from deployments.openai_fields import CHAT, COMPLETIONS, refused_for
from replica.sampling_params import InvalidRequestError

MAX_N = 128            # OpenAI's limit
MAX_STOP = 4           # OpenAI's limit
MAX_LOGPROBS = 20


def valid_unicode(v: str) -> str:
    """Refuse lone surrogates ("\\ud800"): JSON can carry them, UTF-8 cannot."""
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"contains a lone surrogate (U+{ord(v[e.start]):04X}) at position "
                             f"{e.start}; send valid Unicode text") from None
    return v


Text = Annotated[StrictStr, AfterValidator(valid_unicode)]
NonEmptyText = Annotated[Text, Field(min_length=1)]
TokenId = Annotated[StrictInt, Field(ge=0)]
Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]   # ints pass, booleans do not
PromptField = Union[Text, Annotated[list[Text], Field(min_length=1)],
                    Annotated[list[TokenId], Field(min_length=1)],
                    Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]]


def _must_be_off(v, info: ValidationInfo):
    if v:
        raise ValueError(f"{info.field_name} is not supported; leave it false or null")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Optional[StrictBool] = None
    include_obfuscation: Optional[StrictBool] = None      # OpenAI's; no obfuscation is added
    continuous_usage_stats: Optional[StrictBool] = None   # vLLM's

    _off = field_validator("include_obfuscation", "continuous_usage_stats")(_must_be_off)


class _SamplingFields(BaseModel):
    """Honoured fields shared by both endpoints (refused ones are added from the table)."""
    model_config = ConfigDict(extra="forbid")

    model: Optional[Text] = None
    n: Optional[StrictInt] = Field(None, ge=1, le=MAX_N)
    temperature: Optional[Number] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[Number] = Field(None, gt=0.0, le=1.0)
    stop: Optional[Union[NonEmptyText, Annotated[list[NonEmptyText], Field(max_length=MAX_STOP)]]] = None
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63)
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    logit_bias: Optional[dict[StrictStr, Number]] = None
    presence_penalty: Optional[Number] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[Number] = Field(None, ge=-2.0, le=2.0)
    user: Optional[Text] = None
    # vLLM's extensions
    top_k: Optional[StrictInt] = Field(None, ge=-1)
    min_p: Optional[Number] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[Number] = Field(None, gt=0.0, le=2.0)
    ignore_eos: Optional[StrictBool] = None
    stop_token_ids: Optional[Annotated[list[TokenId], Field(max_length=64)]] = None
    min_tokens: Optional[StrictInt] = Field(None, ge=0)

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def samples(self) -> int:
        return 1 if self.n is None else self.n

    def end_user(self) -> Optional[str]:
        return self.user

    def _logprobs(self) -> Optional[int]:
        raise NotImplementedError

    def params_kwargs(self, max_tokens: Optional[int]) -> dict[str, Any]:
        """The SamplingParams fields of this request (None max_tokens: the frontend's default)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true",
                                      "stream_options", "invalid_value")
        stop = self.stop
        stop = () if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
        pick = lambda v, default: default if v is None else v   # noqa: E731
        return dict(max_tokens=max_tokens, min_tokens=pick(self.min_tokens, 0),
                    temperature=float(pick(self.temperature, 1.0)),
                    top_p=float(pick(self.top_p, 1.0)), top_k=max(pick(self.top_k, 0), 0),
                    min_p=float(pick(self.min_p, 0.0)), seed=self.seed, stop=stop,
                    stop_token_ids=tuple(self.stop_token_ids or ()),
                    ignore_eos=pick(self.ignore_eos, False), logprobs=self._logprobs(),
                    presence_penalty=float(pick(self.presence_penalty, 0.0)),
                    frequency_penalty=float(pick(self.frequency_penalty, 0.0)),
                    repetition_penalty=float(pick(self.repetition_penalty, 1.0)),
                    logit_bias=_logit_bias(self.logit_bias))


_DIGITS = re.compile(r"^[0-9]{1,10}$")


def _logit_bias(bias: Optional[dict[str, float]]) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    out = []
    for key, value in bias.items():
        if not _DIGITS.match(key):
            raise InvalidRequestError(f"logit_bias keys must be token ids (decimal integers), got "
                                      f"{key[:20]!r}", "logit_bias", "invalid_value")
        out.append((int(key), float(value)))
    return tuple(out)


class _Completion(_SamplingFields):
    prompt: PromptField
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)

    def _logprobs(self) -> Optional[int]:
        return self.logprobs

    def default_max_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    def prompt_list(self) -> list[Union[str, list[int]]]:
        """The prompt field as a list of prompts: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[Text, list[ContentPart]]] = None
    # Fields OpenAI defines on messages that need tools, audio or names: null (or empty) only.
    name: Optional[Any] = None
    tool_calls: Optional[Any] = None
    tool_call_id: Optional[Any] = None
    function_call: Optional[Any] = None
    audio: Optional[Any] = None
    refusal: Optional[Any] = None

    @field_validator("name", "tool_calls", "tool_call_id", "function_call", "audio", "refusal")
    @classmethod
    def _unsupported(cls, v, info: ValidationInfo):
        if v not in (None, []):
            raise ValueError(f"message {info.field_name} is not supported (tools, audio and "
                             "participant names are not implemented)")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Chat(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    safety_identifier: Optional[Text] = None

    def _logprobs(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs",
                                      "invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None

    def end_user(self) -> Optional[str]:
        return self.user or self.safety_identifier

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _with_refused(name: str, base: type, endpoint: str) -> type:
    """`base` plus every refused field of `endpoint` (typed Any, null by default), each checked
    against its neutral values by one validator that names the field."""
    refused = refused_for(endpoint)

    def check(cls, v, info: ValidationInfo):
        policy = refused[info.field_name]
        if not policy.accepts(v):
            accepted = f" (accepted: {policy.neutral_doc})" if policy.neutral_doc != "null" else ""
            raise ValueError(f"{info.field_name} is not supported: {policy.note}{accepted}")
        return v

    validators = {"_refused": field_validator(*refused)(classmethod(check))}
    fields = {n: (Optional[Any], None) for n in refused}
    return create_model(name, __base__=base, __validators__=validators, __module__=__name__, **fields)


CompletionRequest = _with_refused("CompletionRequest", _Completion, COMPLETIONS)
ChatCompletionRequest = _with_refused("ChatCompletionRequest", _Chat, CHAT)
