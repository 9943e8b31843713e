"""`BatchRunner`: runs one `PromptBatch` on a `replica.Engine` as len(prompts) * n engine requests.

Contract:
- `run(batch)` is an async generator of `list[StreamChunk]`: each item holds every chunk that
  became ready since the previous one, across the batch's sequences (in arrival order);
- `collect(batch)` runs the batch to the end and returns a `BatchResult` ordered by sequence;
- a request the engine refuses (it raises `InvalidRequestError` before its first chunk) fails the
  whole batch: the error is raised to the caller and the other sequences are aborted;
- when the consumer stops iterating or is cancelled, every sequence still running is cancelled,
  which makes the engine abort it and free its KV slot before its next step;
- pacing: `run(batch, paced=True)` (a stream that leaves the replica as Ray items) sends an item
  no sooner than `stream_pacing.interval_s(open paced streams, stream_items_per_s)` after its
  previous one, each sequence's chunks merged; a sequence's first and last chunks go at once
  (deployments/stream_pacing.py);
- backpressure: with `max_sequences` set, a batch that would raise the sequences admitted here
  (running or waiting in the engine, counted until each one ends) above it is refused with
  `ServerOverloadedError` before any of it reaches the engine (an idle runner admits any batch).
  Nothing admitted is dropped; `admitted` is the live count (0 when idle: no leak);
- chunks carry the engine's per-token logprobs and cached prompt tokens (`StreamChunk.logprobs`,
  `.cached_tokens`); `collect` gathers them per sequence.

Ray-free (the engine and the metrics sink are injected), so tests run it on a fake engine.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

from deployments.errors import DEFAULT_RETRY_AFTER_S, ServerOverloadedError
from deployments.latency_histogram import LatencyHistogram
from deployments.protocol import BatchResult, Completion, PromptBatch, StreamChunk, usage_of
from deployments.stream_pacing import Pacer, interval_s, merge_chunks

_DONE = object()


class BatchRunner:
    def __init__(self, engine: Any, metrics: Optional[Any] = None, replica: str = "",
                 max_sequences: Optional[int] = None, retry_after_s: float = DEFAULT_RETRY_AFTER_S,
                 stream_items_per_s: float = 0.0):
        self.engine = engine
        self.metrics = metrics           # has observe_ttft(s) / observe_tpot(s), or None
        self.replica = replica
        self.max_sequences = max_sequences   # running + waiting sequences admitted; None: no bound
        self.retry_after_s = retry_after_s
        self.admitted = 0                    # sequences admitted and not yet ended
        self.refused_batches = 0             # batches refused by the bound
        self.batch_sizes: Counter[int] = Counter()   # sequences per batch -> batches received
        self.stream_items_per_s = stream_items_per_s  # all paced streams together; 0: no pacing
        self.paced_streams = 0                        # paced `run` calls open now
        self.ttft = LatencyHistogram()                # engine-side, per sequence (also to `metrics`)
        self.tpot = LatencyHistogram()                # per token of each later chunk
        self.arrival = LatencyHistogram()             # ingress prepared -> here (PromptBatch.sent_at)

    def _admit(self, n: int) -> None:
        if self.max_sequences is not None and self.admitted and self.admitted + n > self.max_sequences:
            self.refused_batches += 1
            raise ServerOverloadedError(
                f"The server is at its queue limit ({self.max_sequences} sequences running or "
                f"waiting on this replica). Retry after {self.retry_after_s:g} s.", self.retry_after_s)
        self.admitted += n

    def _release(self, _task: Any = None) -> None:
        self.admitted -= 1

    async def run(self, batch: PromptBatch, paced: bool = False) -> AsyncIterator[list[StreamChunk]]:
        if batch.sent_at:
            self.arrival.observe(max(0.0, time.time() - batch.sent_at))
        requests = batch.requests()      # validates; raises InvalidRequestError
        self._admit(len(requests))       # raises ServerOverloadedError
        self.batch_sizes[len(requests)] += 1
        queue: asyncio.Queue = asyncio.Queue()
        pacer = Pacer() if paced and self.stream_items_per_s > 0 else None
        tasks = [asyncio.create_task(self._pump(k, k // batch.n, r, queue, pacer))
                 for k, r in enumerate(requests)]
        for t in tasks:   # a done callback runs even for a task cancelled before it started
            t.add_done_callback(self._release)
        self.paced_streams += pacer is not None
        try:
            remaining = len(tasks)
            while remaining:
                if pacer is not None:
                    await pacer.wait()
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                ready = []
                for item in items:
                    if item is _DONE:
                        remaining -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        ready.append(item)
                if ready:
                    if pacer is not None:
                        pacer.sent(interval_s(self.paced_streams, self.stream_items_per_s))
                        ready = merge_chunks(ready)
                    yield ready
        finally:  # done, failed, or the consumer went away: abort whatever still runs
            self.paced_streams -= pacer is not None
            for t in tasks:
                t.cancel()

    async def collect(self, batch: PromptBatch) -> BatchResult:
        text: dict[int, list[str]] = {}
        ids: dict[int, list[int]] = {}
        logprobs: dict[int, list] = {}
        last: dict[int, StreamChunk] = {}
        async with aclosing(self.run(batch)) as stream:   # cancelled: abort at once, not at GC
            async for chunks in stream:
                for c in chunks:
                    text.setdefault(c.index, []).append(c.text)
                    ids.setdefault(c.index, []).extend(c.token_ids)
                    if c.logprobs is not None:
                        logprobs.setdefault(c.index, []).extend(c.logprobs)
                    last[c.index] = c
        want_logprobs = batch.params.logprobs is not None
        completions = tuple(
            Completion(index=k, prompt_index=c.prompt_index, text="".join(text[k]),
                       token_ids=tuple(ids[k]), finish_reason=c.finish_reason or "abort",
                       prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                       logprobs=tuple(logprobs.get(k, ())) if want_logprobs else None,
                       cached_tokens=c.cached_tokens)
            for k, c in sorted(last.items()))
        return BatchResult(completions, usage_of(completions, batch.n), self.engine.model_name,
                           self.replica)

    async def _pump(self, index: int, prompt_index: int, request: Any, queue: asyncio.Queue,
                    pacer: Optional[Pacer] = None) -> None:
        """Feed one sequence's chunks into the batch's queue, then _DONE (or the exception); wake
        a paced stream for the sequence's first and last chunks."""
        t_last, first = time.perf_counter(), True
        try:
            async for c in self.engine.generate(request):
                now = time.perf_counter()
                self._observe(first, now - t_last, len(c.token_ids))
                queue.put_nowait(StreamChunk(index, prompt_index, c.text, tuple(c.token_ids),
                                             c.finish_reason, c.prompt_tokens, c.completion_tokens,
                                             c.logprobs, c.cached_tokens))
                if pacer is not None and (first or c.finish_reason is not None):
                    pacer.wake()
                t_last, first = now, False
            queue.put_nowait(_DONE)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the batch, which fails as a whole
            queue.put_nowait(e)
        if pacer is not None:   # the end (or a failure) is never held either
            pacer.wake()

    def _observe(self, first: bool, seconds: float, tokens: int) -> None:
        if first:
            self.ttft.observe(seconds)
            if self.metrics is not None:
                self.metrics.observe_ttft(seconds)
        elif tokens:
            self.tpot.observe(seconds / tokens)
            if self.metrics is not None:
                self.metrics.observe_tpot(seconds / tokens)
