"""Fakes shared by the tests/unit/test_deployments_* modules (no tests here; the name follows the
file-ownership pattern of those modules).

`FakeEngine` follows the `replica.Engine` contract of docs/engine-api.md that deployments/ relies
on: `generate(request)` is an async generator of `GenerationChunk`s that raises
`InvalidRequestError` before its first chunk, and stopping early aborts the request. It records
what started, finished and was aborted. Its output is deterministic: sequence token i is the byte
of 'a' + i, one per chunk, with finish_reason "length" after max_tokens.

Prompt token ids steer failures: `REFUSE` anywhere in a prompt makes the engine refuse it,
`FAIL_AFTER_FIRST` makes the step fail after one chunk, `HANG` makes it wait until aborted.

With `params.logprobs = k` every chunk carries one `TokenLogprob` per token: the chosen token with
log-probability -0.5, and k alternatives (token + 1 + j, -1 - j). `cached_tokens` (a constructor
argument) is reported on every chunk; `step_s` (a constructor argument) is the time between a
sequence's chunks (0: one event-loop turn).
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from deployments.batch_runner import BatchRunner
from deployments.frontend import Frontend
from replica.sampling_params import GenerationChunk, InvalidRequestError, TokenLogprob
from replica.stats import EngineStats
from replica.tokenizer import ByteTokenizer

REFUSE, FAIL_AFTER_FIRST, HANG = 250, 251, 252


class FakeEngine:
    model_name = "random:tiny"

    def __init__(self, cached_tokens: int = 0, step_s: float = 0.0) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.requests: list = []          # every GenerationRequest received, refused ones too
        self.cached_tokens = cached_tokens
        self.step_s = step_s
        self.tokenizer = ByteTokenizer()

    async def generate(self, request) -> Any:
        self.requests.append(request)
        ids = list(request.prompt_token_ids or self.tokenizer.encode(request.prompt))
        if REFUSE in ids:
            raise InvalidRequestError(f"prompt token ids must be in [0, {REFUSE})")
        rid, n = request.request_id, request.params.max_tokens
        self.started.append(rid)
        done = False
        try:
            for i in range(n):
                await asyncio.sleep(self.step_s)
                if HANG in ids:
                    await asyncio.Event().wait()
                if FAIL_AFTER_FIRST in ids and i == 1:
                    raise RuntimeError("step failed")
                tok = ord("a") + i % 26
                last = i == n - 1
                k = request.params.logprobs
                lps = None if k is None else (
                    TokenLogprob(tok, -0.5, tuple((tok + 1 + j, -1.0 - j) for j in range(k))),)
                yield GenerationChunk(rid, (tok,), chr(tok), "length" if last else None,
                                      prompt_tokens=len(ids), completion_tokens=i + 1, logprobs=lps,
                                      cached_tokens=self.cached_tokens)
            done = True
            self.finished.append(rid)
        finally:
            if not done:
                self.aborted.append(rid)

    def stats(self) -> EngineStats:
        return EngineStats(captured_buckets=(1, 2, 4), graphs=False, max_seq_len=64, max_num_seqs=4,
                           running=1, free_slots=3, queued=2, fallback="eager",
                           decode_steps={(2, "eager"): 5}, padded_rows={2: 1})


class RecordingBackend:
    """A `Frontend` backend running batches on a FakeEngine in-process, recording routing hints."""

    def __init__(self, engine: Optional[FakeEngine] = None):
        self.engine = engine or FakeEngine()
        self.runner = BatchRunner(self.engine, replica="fake-replica")
        self.calls: list[tuple[Any, Any]] = []

    async def generate(self, batch, hint):
        self.calls.append((batch, hint))
        return await self.runner.collect(batch)

    def stream(self, batch, hint):
        self.calls.append((batch, hint))
        return self.runner.run(batch)


def make_frontend(max_seq_len: int = 64, **kwargs) -> tuple[Frontend, RecordingBackend]:
    """A Frontend over a RecordingBackend; kwargs go to Frontend (vocab_size, max_sequences)."""
    backend = RecordingBackend(FakeEngine(kwargs.pop("cached_tokens", 0)))
    return Frontend(ByteTokenizer(), "random:tiny", max_seq_len, backend, **kwargs), backend
