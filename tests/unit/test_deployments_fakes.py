"""Fakes shared by the tests/unit/test_deployments_* modules (no tests here; the name follows the
file-ownership pattern of those modules).

`FakeEngine` follows the `replica.Engine` contract of docs/engine-api.md that deployments/ relies
on: `generate(request)` is an async generator of `GenerationChunk`s that raises
`InvalidRequestError` before its first chunk, and stopping early aborts the request. It records
what started, finished and was aborted. Its output is deterministic: sequence token i is the byte
of 'a' + i, one per chunk, with finish_reason "length" after max_tokens.

Prompt token ids steer failures: `REFUSE` anywhere in a prompt makes the engine refuse it,
`FAIL_AFTER_FIRST` makes the step fail after one chunk, `HANG` makes it wait until aborted.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from deployments.batch_runner import BatchRunner
from deployments.frontend import Frontend
from replica.sampling_params import GenerationChunk, InvalidRequestError
from replica.stats import EngineStats
from replica.tokenizer import ByteTokenizer

REFUSE, FAIL_AFTER_FIRST, HANG = 250, 251, 252


class FakeEngine:
    model_name = "random:tiny"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.tokenizer = ByteTokenizer()

    async def generate(self, request) -> Any:
        ids = list(request.prompt_token_ids or self.tokenizer.encode(request.prompt))
        if REFUSE in ids:
            raise InvalidRequestError(f"prompt token ids must be in [0, {REFUSE})")
        rid, n = request.request_id, request.params.max_tokens
        self.started.append(rid)
        done = False
        try:
            for i in range(n):
                await asyncio.sleep(0)
                if HANG in ids:
                    await asyncio.Event().wait()
                if FAIL_AFTER_FIRST in ids and i == 1:
                    raise RuntimeError("step failed")
                tok = ord("a") + i % 26
                last = i == n - 1
                yield GenerationChunk(rid, (tok,), chr(tok), "length" if last else None,
                                      prompt_tokens=len(ids), completion_tokens=i + 1)
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


def make_frontend(max_seq_len: int = 64) -> tuple[Frontend, RecordingBackend]:
    backend = RecordingBackend()
    return Frontend(ByteTokenizer(), "random:tiny", max_seq_len, backend), backend
