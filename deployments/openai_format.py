"""OpenAI wire format of responses: completion and chat bodies, stream chunks, usage, logprobs.

Contract:
- `completion_body` / `chat_body` answer a whole batch; `completion_chunk` / `chat_chunk` are one
  server-sent event's payload; `sse(obj)` frames one event (`sse("[DONE]")` ends a stream).
- usage always carries `prompt_tokens_details.cached_tokens` (prompt tokens served from the prefix
  cache).
- logprobs follow OpenAI's two shapes. Completions: `{tokens, token_logprobs, top_logprobs,
  text_offset}` where `top_logprobs[i]` maps token text to log-probability for the k alternatives
  plus the chosen token (so up to k + 1 entries, as OpenAI documents). Chat: `{content: [{token,
  logprob, bytes, top_logprobs: [{token, logprob, bytes}] x k}], refusal: null}`. A log-probability
  of -inf is sent as -9999.0 (OpenAI's convention; JSON has no infinity). `TokenText` turns token
  ids into their text and bytes with the served model's tokenizer.

Pure dicts: no Ray, no FastAPI.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from functools import lru_cache
from typing import Any, Optional, Sequence

from deployments.protocol import Completion, StreamChunk, Usage
from replica.sampling_params import TokenLogprob

MIN_LOGPROB = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj: Any) -> str:
    """One server-sent event; `sse("[DONE]")` ends a stream."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n"


class TokenText:
    """Token id -> the bytes it adds to a text (`tokenizer.token_bytes`: a leading space included,
    a partial character's own bytes) and their text (U+FFFD for a partial character), cached (a
    vocabulary is bounded)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return bytes(self.bytes(token_id)).decode("utf-8", errors="replace")

    def _bytes(self, token_id: int) -> tuple[int, ...]:
        return tuple(self._tok.token_bytes(token_id))


def _lp(v: float) -> float:
    return MIN_LOGPROB if math.isnan(v) or v < MIN_LOGPROB else float(v)


def completion_logprobs(lps: Sequence[TokenLogprob], tt: TokenText, offset: int = 0) -> dict:
    """The completions `logprobs` object for these tokens; `offset` is the text length before them."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        text = tt.text(lp.token_id)
        top = {tt.text(i): _lp(v) for i, v in lp.top}
        top.setdefault(text, _lp(lp.logprob))
        out["tokens"].append(text)
        out["token_logprobs"].append(_lp(lp.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(lps: Sequence[TokenLogprob], tt: TokenText) -> dict:
    def entry(token_id: int, value: float) -> dict:
        return {"token": tt.text(token_id), "logprob": _lp(value), "bytes": list(tt.bytes(token_id))}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in lps],
            "refusal": None}


def usage_body(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def completion_body(rid: str, model: str, completions: Sequence[Completion], usage: Usage,
                    tt: Optional[TokenText] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": completion_logprobs(c.logprobs, tt)
                         if c.logprobs is not None and tt else None} for c in completions],
            "usage": usage_body(usage)}


def chat_body(rid: str, model: str, completions: Sequence[Completion], usage: Usage,
              tt: Optional[TokenText] = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": chat_logprobs(c.logprobs, tt)
                         if c.logprobs is not None and tt else None,
                         "finish_reason": c.finish_reason} for c in completions],
            "usage": usage_body(usage)}


def completion_chunk(rid: str, model: str, created: int, c: StreamChunk,
                     logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": logprobs,
                         "finish_reason": c.finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict,
               finish_reason: Optional[str] = None, logprobs: Optional[dict] = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, usage: Usage) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage_body(usage)}


def models_body(model: str, max_seq_len: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                        "owned_by": "graphserve", "max_model_len": max_seq_len}]}
