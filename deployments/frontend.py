"""`Frontend`: turns user input into a routed `PromptBatch`, for both the HTTP and the Python API.

Contract: `prepare(...)` tokenizes the prompts (the ingress holds the model's tokenizer, loaded
without weights), checks every length against `max_seq_len`, every token id (prompt, logit_bias,
stop_token_ids) against the model's vocabulary, and the batch's sequences (prompts x n) against
`max_sequences` (a replica's capacity), and returns the batch together with the `RoutingHint` the
router needs (`num_sequences = len(prompts) * n`, `max_total_tokens = longest prompt +
max_tokens`, prompt tokens, output budget, and each prompt's prefix hashes at the replicas'
`block_size`, replica/block_hash.py). Bad input raises `RequestError` (an `InvalidRequestError`
naming the field in `.param`) before anything is sent to a replica, so a rejected request never
occupies a decode slot and no replica logs it.

A `Backend` runs prepared batches: in Serve it wraps the replica deployment's handle (the router
runs in the caller's process, so here); unit tests pass a fake. A backend may also offer
`async ready() -> bool` (whether a replica can serve now; `/health` reports it). No Ray, no
FastAPI here.

Timing (`latency()`): histograms of `prepare`'s own time (tokenizer, checks, prefix hashes) and of
a stream's first item, from the `stream` call until the backend hands over its first chunks
(router, the hop to a replica, the engine's TTFT, the hop back). Next to the replicas' own TTFT
and a client's, they split the path in front of the engine.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator, Optional, Protocol, Sequence, Union

from deployments.latency_histogram import LatencyHistogram
from deployments.protocol import BatchResult, PromptBatch, StreamChunk
from replica.block_hash import prefix_summary
from replica.sampling_params import InvalidRequestError, SamplingParams
from replica.presets import PRESETS, is_random
from router.stats import RoutingHint

PromptInput = Union[str, Sequence[int]]


class RequestError(InvalidRequestError):
    """Bad input, with the OpenAI error fields the HTTP layer reports (always a 400)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code


class Backend(Protocol):
    async def generate(self, batch: PromptBatch, hint: RoutingHint) -> BatchResult: ...

    def stream(self, batch: PromptBatch, hint: RoutingHint) -> AsyncIterator[list[StreamChunk]]: ...


def model_vocab_size(model: str) -> Optional[int]:
    """The model's vocabulary size from its config (no weights); None when unknown."""
    if is_random(model):
        return PRESETS.get(model.split(":", 1)[1], {}).get("vocab_size")
    try:
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if isinstance(size, int) else None


class Frontend:
    def __init__(self, tokenizer, model_name: str, max_seq_len: int, backend: Backend, *,
                 vocab_size: Optional[int] = None, max_sequences: Optional[int] = None,
                 block_size: int = 16):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_seq_len = max_seq_len
        self.backend = backend
        self.block_size = block_size      # the replicas' KV block size: prefix hashes must use it
        self.vocab_size = vocab_size          # None: token ids are checked by the engine only
        self.max_sequences = max_sequences    # sequences one request may hold; None: no bound
        self._token_text = None
        self.prepare_time = LatencyHistogram()    # prepare(): tokenize, check, hash (successful ones)
        self.first_item = LatencyHistogram()      # stream(): call -> the backend's first chunks

    # -- input -> batch -------------------------------------------------------------------------
    def prepare(self, prompts: Sequence[PromptInput], params_kwargs: dict, *, n: int = 1,
                default_max_tokens: Optional[int] = 16, param: str = "prompt",
                user: Optional[str] = None) -> tuple[PromptBatch, RoutingHint]:
        """Tokenize and check a batch. `params_kwargs` are SamplingParams fields; a missing
        max_tokens defaults to `default_max_tokens`, or to the room left in the context when that
        is None (OpenAI's chat behaviour)."""
        t0 = time.perf_counter()
        batch, hint = self._prepare(prompts, params_kwargs, n, default_max_tokens, param, user)
        self.prepare_time.observe(time.perf_counter() - t0)
        return batch, hint

    def _prepare(self, prompts, params_kwargs, n, default_max_tokens, param, user):
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]  # one text or one token-id prompt, like OpenAI's `prompt` field
        if not isinstance(prompts, Sequence) or not prompts:
            raise RequestError("prompts must be a non-empty list of strings or token-id lists", param)
        ids = [self._token_ids(p, param, i) for i, p in enumerate(prompts)]
        longest = max(len(x) for x in ids)
        kwargs = dict(params_kwargs)
        max_tokens = kwargs.pop("max_tokens", None)
        if max_tokens is None:
            max_tokens = default_max_tokens
        if max_tokens is None:  # as much as the context allows
            max_tokens = max(self.max_seq_len - longest, 1)
        params = SamplingParams(max_tokens=max_tokens, **kwargs)  # raises InvalidRequestError
        self._check_vocab(params)
        self._check_context(longest, max_tokens, param)
        self._check_size(len(ids), n, param)
        batch = PromptBatch(tuple(tuple(x) for x in ids), params, n=n,
                            request_id=f"gs-{uuid.uuid4().hex[:16]}", user=user, sent_at=time.time())
        return batch, self.hint(ids, n, max_tokens)

    def hint(self, ids: list[list[int]], n: int, max_tokens: int) -> RoutingHint:
        """What the router estimates cost from (router/stats.py): sequences, prompt tokens, output
        budget and each prompt's chained block hashes at summary depths (one per prompt, however
        many samples it has)."""
        return RoutingHint(num_sequences=len(ids) * n, max_total_tokens=max(map(len, ids)) + max_tokens,
                           prompt_tokens=sum(map(len, ids)) * n, max_new_tokens=len(ids) * n * max_tokens,
                           prefix_hashes=tuple(prefix_summary(x, self.block_size) for x in ids),
                           samples_per_prompt=n)

    def prepare_chat(self, conversations: Sequence[Sequence[dict]], params_kwargs: dict, *,
                     n: int = 1, user: Optional[str] = None) -> tuple[PromptBatch, RoutingHint]:
        """Like `prepare`, for chat: each conversation goes through the model's chat template."""
        ids = [self._chat_ids(messages) for messages in conversations]
        return self.prepare(ids, params_kwargs, n=n, default_max_tokens=None, param="messages",
                            user=user)

    def _chat_ids(self, messages: Sequence[dict]) -> list[int]:
        try:
            return self.tokenizer.chat_ids(list(messages))
        except UnicodeEncodeError as e:
            raise RequestError(f"messages contain a lone surrogate at position {e.start}; send "
                               "valid Unicode text", "messages", "invalid_value") from None
        except Exception as e:  # a template's raise_exception ("roles must alternate", ...)
            if not any(c.__name__ == "TemplateError" for c in type(e).__mro__):
                raise
            raise RequestError(f"the model's chat template refused these messages: {e}",
                               "messages", "invalid_value") from None

    def _token_ids(self, prompt: PromptInput, param: str, i: int) -> list[int]:
        if isinstance(prompt, str):
            try:
                ids = self.tokenizer.encode(prompt)
            except UnicodeEncodeError as e:
                raise RequestError(f"prompt {i} contains a lone surrogate at position {e.start}; "
                                   "send valid Unicode text", param, "invalid_value") from None
        elif isinstance(prompt, Sequence):
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise RequestError(f"prompt {i}: token ids must be non-negative integers", param)
            if self.vocab_size is not None and ids and max(ids) >= self.vocab_size:
                raise RequestError(f"prompt {i}: token ids must be in [0, {self.vocab_size})", param,
                                   "invalid_value")
        else:
            raise RequestError(f"prompt {i} must be a string or a list of token ids, "
                               f"got {type(prompt).__name__}", param)
        if not ids:
            raise RequestError(f"prompt {i} is empty", param)
        return ids

    def _check_vocab(self, params: SamplingParams) -> None:
        if self.vocab_size is None:
            return
        for name, ids in (("logit_bias", [k for k, _ in params.logit_bias]),
                          ("stop_token_ids", params.stop_token_ids)):
            if ids and max(ids) >= self.vocab_size:
                raise RequestError(f"{name}: token ids must be in [0, {self.vocab_size})", name,
                                   "invalid_value")

    def _check_size(self, prompts: int, n: int, param: str) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise RequestError(f"n must be a positive integer, got {n!r}", "n", "invalid_value")
        if self.max_sequences is None or prompts * n <= self.max_sequences:
            return
        raise RequestError(f"{prompts} prompt(s) x n={n} is {prompts * n} sequences; one request may "
                           f"hold at most {self.max_sequences} (a replica's capacity)",
                           "n" if n > 1 else param, "invalid_value")

    def _check_context(self, longest: int, max_tokens: int, param: str) -> None:
        if longest + max_tokens <= self.max_seq_len:
            return
        raise RequestError(
            f"This model's maximum context length is {self.max_seq_len} tokens. However, you "
            f"requested {longest + max_tokens} tokens ({longest} in the {param}, {max_tokens} for "
            f"the completion). Please reduce the length of the {param} or the completion.",
            param, "context_length_exceeded")

    @property
    def token_text(self):
        """Token id -> text/bytes for logprobs (deployments.openai_format.TokenText)."""
        if self._token_text is None:
            from deployments.openai_format import TokenText
            self._token_text = TokenText(self.tokenizer)
        return self._token_text

    # -- running --------------------------------------------------------------------------------
    async def ready(self) -> bool:
        """Whether a replica can take a request now (a backend without `ready()` always can)."""
        ready = getattr(self.backend, "ready", None)
        return True if ready is None else await ready()

    async def generate(self, batch: PromptBatch, hint: RoutingHint) -> BatchResult:
        return await self.backend.generate(batch, hint)

    async def stream(self, batch: PromptBatch, hint: RoutingHint) -> AsyncIterator[list[StreamChunk]]:
        t0, first = time.perf_counter(), True
        async with aclosing(self.backend.stream(batch, hint)) as chunks_stream:
            async for chunks in chunks_stream:
                if first:
                    self.first_item.observe(time.perf_counter() - t0)
                    first = False
                yield chunks

    def latency(self) -> dict[str, list[int]]:
        """Histogram counts (deployments/latency_histogram.py) of prepare() and of streams' first items."""
        return {"prepare_ms_counts": list(self.prepare_time.counts),
                "first_item_ms_counts": list(self.first_item.counts)}
