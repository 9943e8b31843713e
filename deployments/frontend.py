"""`Frontend`: turns user input into a routed `PromptBatch`, for both the HTTP and the Python API.

Contract: `prepare(...)` tokenizes the prompts (the ingress holds the model's tokenizer, loaded
without weights), checks every length against `max_seq_len`, and returns the batch together with
the `RoutingHint` the router needs (`num_sequences = len(prompts) * n`, `max_total_tokens =
longest prompt + max_tokens`, prompt tokens, output budget, and each prompt's prefix hashes at
the replicas' `block_size`, replica/block_hash.py). Bad input raises `RequestError` (an `InvalidRequestError`) before
anything is sent to a replica, so a rejected request never occupies a decode slot.

A `Backend` runs prepared batches: in Serve it wraps the replica deployment's handle (the router
runs in the caller's process, so here); unit tests pass a fake. No Ray, no FastAPI here.
"""
from __future__ import annotations

import uuid
from typing import AsyncIterator, Optional, Protocol, Sequence, Union

from deployments.protocol import BatchResult, PromptBatch, StreamChunk
from replica.block_hash import prefix_summary
from replica.sampling_params import InvalidRequestError, SamplingParams
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


class Frontend:
    def __init__(self, tokenizer, model_name: str, max_seq_len: int, backend: Backend,
                 block_size: int = 16):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_seq_len = max_seq_len
        self.backend = backend
        self.block_size = block_size      # the replicas' KV block size: prefix hashes must use it

    # -- input -> batch -------------------------------------------------------------------------
    def prepare(self, prompts: Sequence[PromptInput], params_kwargs: dict, *, n: int = 1,
                default_max_tokens: Optional[int] = 16, param: str = "prompt",
                ) -> tuple[PromptBatch, RoutingHint]:
        """Tokenize and check a batch. `params_kwargs` are SamplingParams fields; a missing
        max_tokens defaults to `default_max_tokens`, or to the room left in the context when that
        is None (OpenAI's chat behaviour)."""
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
        self._check_context(longest, max_tokens, param)
        batch = PromptBatch(tuple(tuple(x) for x in ids), params, n=n,
                            request_id=f"gs-{uuid.uuid4().hex[:16]}")
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
                     n: int = 1) -> tuple[PromptBatch, RoutingHint]:
        """Like `prepare`, for chat: each conversation goes through the model's chat template."""
        ids = [self.tokenizer.chat_ids(list(messages)) for messages in conversations]
        return self.prepare(ids, params_kwargs, n=n, default_max_tokens=None, param="messages")

    def _token_ids(self, prompt: PromptInput, param: str, i: int) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, Sequence):
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise RequestError(f"prompt {i}: token ids must be non-negative integers", param)
        else:
            raise RequestError(f"prompt {i} must be a string or a list of token ids, "
                               f"got {type(prompt).__name__}", param)
        if not ids:
            raise RequestError(f"prompt {i} is empty", param)
        return ids

    def _check_context(self, longest: int, max_tokens: int, param: str) -> None:
        if longest + max_tokens <= self.max_seq_len:
            return
        raise RequestError(
            f"This model's maximum context length is {self.max_seq_len} tokens. However, you "
            f"requested {longest + max_tokens} tokens ({longest} in the {param}, {max_tokens} for "
            f"the completion). Please reduce the length of the {param} or the completion.",
            param, "context_length_exceeded")

    # -- running --------------------------------------------------------------------------------
    async def generate(self, batch: PromptBatch, hint: RoutingHint) -> BatchResult:
        return await self.backend.generate(batch, hint)

    def stream(self, batch: PromptBatch, hint: RoutingHint) -> AsyncIterator[list[StreamChunk]]:
        return self.backend.stream(batch, hint)
