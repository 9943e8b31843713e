"""Stream pacing: how many Ray items a replica's token streams send, and what each one carries.

Every item of a Serve streaming call is a Ray object, and one costs far more than one token's
work: measured on the dev box (2 cores, benchmarks/stream_items.py), one handle hop moves ~3k
items/s and the ingress's two hops ~1.7k, whatever the items hold. At one item per decode step,
80 streams at 8 ms steps ask for 10k items/s: on 2x H200 a 160-conversation chat burst delivered
2.2k tokens/s at 100 ms per token, paced by Ray, not by the GPUs. Ray Serve LLM batches its
streams every 50 ms for the same reason (`stream_batching_interval_ms`).

Contract: a paced stream sends its next item no sooner than `interval(streams)` after its previous
one, where `streams` is the number of paced streams open on the replica:

    interval = min(streams / items_per_s, MAX_INTERVAL_S)

so the replica's streams send about `items_per_s` items per second in all, and a lone stream is
never held (1 / items_per_s is below a decode step). What arrives meanwhile goes out as one item,
each sequence's chunks merged into one (`merge_chunks`). A sequence's first chunk and its last are
never held: they wake the stream at once, so pacing adds nothing to time to first token or to the
end of a completion. `items_per_s = 0` turns pacing off (one item per decode step).
"""
from __future__ import annotations

import asyncio
from typing import Optional

from deployments.protocol import StreamChunk

MAX_INTERVAL_S = 0.2   # past 512 streams at 500 items/s a stream still updates 5 times a second


def interval_s(streams: int, items_per_s: float) -> float:
    """Seconds between two items of one stream when `streams` paced streams are open."""
    if items_per_s <= 0 or streams <= 0:
        return 0.0
    return min(streams / items_per_s, MAX_INTERVAL_S)


class Pacer:
    """One stream's clock: `wait()` returns at the stream's next send time, or at once after
    `wake()` (a first or last chunk is waiting). Call `sent(interval)` before yielding an item,
    so that a `wake()` during the yield is kept for the next `wait()`."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._next_at = 0.0
        self._urgent = False
        self._waiter: Optional[asyncio.Future] = None

    def wake(self) -> None:
        self._urgent = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def sent(self, interval: float) -> None:
        self._urgent = False
        self._next_at = self._loop.time() + interval

    async def wait(self) -> None:
        delay = self._next_at - self._loop.time()
        if self._urgent or delay <= 0:
            return
        self._waiter = self._loop.create_future()
        timer = self._loop.call_later(delay, _resolve, self._waiter)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def merge_chunks(chunks: list[StreamChunk]) -> list[StreamChunk]:
    """One chunk per sequence, in the order the sequences first appear: text, token ids and
    logprobs joined; finish reason and counts from the last; cached tokens the largest."""
    by_index: dict[int, list[StreamChunk]] = {}
    for c in chunks:
        by_index.setdefault(c.index, []).append(c)
    return [group[0] if len(group) == 1 else _merge(group) for group in by_index.values()]


def _merge(group: list[StreamChunk]) -> StreamChunk:
    last = group[-1]
    with_lp = [c.logprobs for c in group if c.logprobs is not None]
    return StreamChunk(
        last.index, last.prompt_index, "".join(c.text for c in group),
        tuple(t for c in group for t in c.token_ids), last.finish_reason, last.prompt_tokens,
        last.completion_tokens, tuple(lp for lps in with_lp for lp in lps) if with_lp else None,
        max(c.cached_tokens for c in group))
