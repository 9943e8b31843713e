"""The ingress's own timing (`Frontend.latency`): prepare() and a stream's first item, counted in
histograms that a benchmark differences between two snapshots (deployments/latency_histogram.py)."""
from __future__ import annotations

import asyncio

from deployments.latency_histogram import percentile
from test_deployments_fakes import make_frontend


class _SlowFirst:
    """A backend whose first item arrives after `delay_s`, then two more at once."""

    def __init__(self, delay_s: float):
        self.delay_s, self.closed = delay_s, False

    async def stream(self, batch, hint):
        try:
            await asyncio.sleep(self.delay_s)
            for i in range(3):
                yield [i]
        finally:
            self.closed = True


def _drain(frontend, batch, hint, stop_after=None):
    async def go():
        got = []
        async for chunks in frontend.stream(batch, hint):
            got.append(chunks)
            if stop_after is not None and len(got) == stop_after:
                break
        return got
    return asyncio.run(go())


def test_first_item_time_is_the_backends_first_chunk():
    frontend, _ = make_frontend()
    slow = _SlowFirst(0.05)
    frontend.backend = slow
    batch, hint = frontend.prepare([[1, 2, 3]], {"max_tokens": 3})
    assert _drain(frontend, batch, hint) == [[0], [1], [2]]
    counts = frontend.latency()
    assert sum(counts["first_item_ms_counts"]) == 1          # one stream, one first item
    assert 50 <= percentile(counts["first_item_ms_counts"], 50) < 200
    assert sum(counts["prepare_ms_counts"]) == 1
    assert percentile(counts["prepare_ms_counts"], 50) < 50


def test_a_stream_closed_early_closes_the_backends_and_counts_once():
    frontend, _ = make_frontend()
    slow = _SlowFirst(0.0)
    frontend.backend = slow
    batch, hint = frontend.prepare(["hi"], {"max_tokens": 3})
    assert _drain(frontend, batch, hint, stop_after=1) == [[0]]
    assert slow.closed
    assert sum(frontend.latency()["first_item_ms_counts"]) == 1


def test_refused_input_is_not_timed():
    frontend, _ = make_frontend(max_seq_len=8)
    try:
        frontend.prepare([[1] * 20], {"max_tokens": 3})
    except Exception:  # noqa: BLE001 - RequestError: the prompt is longer than max_seq_len
        pass
    else:
        raise AssertionError("a 20-token prompt passed max_seq_len=8")
    assert sum(frontend.latency()["prepare_ms_counts"]) == 0


def test_the_replica_counts_each_batchs_arrival_from_the_ingress_stamp():
    import time
    frontend, backend = make_frontend()
    before = time.time()
    batch, hint = frontend.prepare([[1, 2, 3]], {"max_tokens": 2})
    assert before <= batch.sent_at <= time.time()
    time.sleep(0.03)                                   # the "hop"
    assert len(_drain(frontend, batch, hint)) >= 1
    counts = backend.runner.arrival.counts
    assert sum(counts) == 1 and 30 <= percentile(counts, 50) < 1000
    unstamped = batch.__class__(batch.prompts, batch.params)       # sent_at 0: not counted
    _drain(frontend, unstamped, hint)
    assert sum(backend.runner.arrival.counts) == 1
