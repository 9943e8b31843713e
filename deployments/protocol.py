"""The request and result types that cross Ray handles: the Python API of graphserve.

The unit of work is a *request batch*: a `PromptBatch` of prompts (text or token ids) sharing one
`SamplingParams`, each prompt sampled `n` times. Its sequences are numbered prompt-major: sequence
`i * n + j` is prompt `i`'s `j`-th sample, the order OpenAI uses for `choices`. A batch is routed,
admitted and answered as one request; `BatchResult.completions[k]` belongs to sequence `k`.

Streams yield `list[StreamChunk]`: every chunk that became ready since the previous item, across
the batch's sequences (one Ray streaming item per wake-up, not one per token per sequence).

Log-probabilities ride along when the batch's `SamplingParams.logprobs` is set: each chunk's
`logprobs` has one `replica.sampling_params.TokenLogprob` per token of its `token_ids`, and a
`Completion` gathers them for the whole sequence. `cached_tokens` counts prompt tokens the engine
served from its prefix cache (OpenAI's `usage.prompt_tokens_details.cached_tokens`).

Plain frozen dataclasses, no torch and no Ray, so a driver needs only `deployments` and `replica`
importable to read results. Validation lives in `SamplingParams` / `GenerationRequest`, which raise
`replica.InvalidRequestError`; `PromptBatch` adds only the batch-level checks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from replica.sampling_params import GenerationRequest, InvalidRequestError, SamplingParams, TokenLogprob

Prompt = Union[str, tuple[int, ...]]
MAX_SEQUENCES_PER_BATCH = 4096  # a guard against accidental huge batches, not an engine limit


@dataclass(frozen=True)
class PromptBatch:
    prompts: tuple[Prompt, ...]   # text, or token ids (what the ingress sends after tokenizing)
    params: SamplingParams
    n: int = 1                    # samples per prompt
    request_id: Optional[str] = None
    user: Optional[str] = None    # the end user's id (OpenAI's `user`), logged with the request
    # time.time() when the ingress prepared it (0: unknown); the replica counts its arrival delay
    # (routing + the hop) from it, meaningful where both clocks agree (one host, or NTP-close)
    sent_at: float = 0.0

    def __post_init__(self) -> None:
        try:
            prompts = tuple(p if isinstance(p, str) else tuple(int(t) for t in p) for p in self.prompts)
        except (TypeError, ValueError):
            raise InvalidRequestError("each prompt must be a string or a list of token ids") from None
        object.__setattr__(self, "prompts", prompts)
        if not prompts:
            raise InvalidRequestError("the batch has no prompts")
        if not isinstance(self.n, int) or self.n < 1:
            raise InvalidRequestError(f"n must be a positive integer, got {self.n!r}")
        if self.num_sequences > MAX_SEQUENCES_PER_BATCH:
            raise InvalidRequestError(f"{len(prompts)} prompts x n={self.n} is {self.num_sequences} "
                                      f"sequences; at most {MAX_SEQUENCES_PER_BATCH} per batch")

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * self.n

    def requests(self) -> list[GenerationRequest]:
        """One engine request per sequence, prompt-major. With a seed, sample j of a prompt uses
        seed + j, so the n samples differ but the batch stays reproducible."""
        out = []
        rid = self.request_id or "batch"
        for i, prompt in enumerate(self.prompts):
            for j in range(self.n):
                params = self.params
                if j and params.seed is not None:
                    params = _with_seed(params, (params.seed + j) % 2**63)
                kind = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
                out.append(GenerationRequest(params=params, request_id=f"{rid}-{i * self.n + j}", **kind))
        return out


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(params, seed=seed)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int       # each prompt counted once, however many samples it has
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0   # of prompt_tokens, served from the prefix cache


@dataclass(frozen=True)
class Completion:
    index: int               # sequence number i * n + j
    prompt_index: int        # i
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str       # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    logprobs: Optional[tuple[TokenLogprob, ...]] = None   # one per token, when asked for
    cached_tokens: int = 0


@dataclass(frozen=True)
class BatchResult:
    completions: tuple[Completion, ...]
    usage: Usage
    model: str
    replica: str = ""        # the replica that served the batch (its Serve replica id)


@dataclass(frozen=True)
class StreamChunk:
    index: int               # sequence number i * n + j
    prompt_index: int
    text: str                # new text since this sequence's previous chunk
    token_ids: tuple[int, ...]
    finish_reason: Optional[str] = None   # set on the sequence's last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0            # generated so far
    logprobs: Optional[tuple[TokenLogprob, ...]] = None   # one per token of token_ids, when asked for
    cached_tokens: int = 0                # prompt tokens served from the prefix cache


def usage_of(completions: Sequence[Completion], n: int) -> Usage:
    first = [c for c in completions if c.index % n == 0]
    prompt = sum(c.prompt_tokens for c in first)
    completion = sum(c.completion_tokens for c in completions)
    return Usage(prompt, completion, prompt + completion, sum(c.cached_tokens for c in first))
