"""`LatencyHistogram`: a replica's own TTFT and TPOT, as counts over fixed log-spaced buckets.

The Prometheus histograms (replica_metrics.py) go to a scraper; these counts travel in the
replica's `counters()` so a benchmark can take the difference of two snapshots and read the
replica-side percentiles of one phase (`percentile(counts, q)`), next to what its clients saw:
the gap is the path in front of the engine (ingress, Ray, the client process).

Buckets: upper bounds `BOUNDS_MS`, ten per decade from 0.1 ms to 100 s (each 26% wider than the
last), plus one for anything above. Pure Python; `counts` is a plain list of ints.
"""
from __future__ import annotations

import bisect
from typing import Optional, Sequence

BOUNDS_MS = tuple(10 ** (k / 10) for k in range(-10, 51))   # 0.1 ms .. 100 s


class LatencyHistogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS_MS) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS_MS, seconds * 1e3)] += 1


def percentile(counts: Sequence[int], q: float) -> Optional[float]:
    """The q-th percentile (ms) of the values counted: the upper bound of the bucket holding it
    (the overflow bucket reads as the last bound); None for no values."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q / 100 * total, 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank and n:
            return BOUNDS_MS[min(i, len(BOUNDS_MS) - 1)]
    return BOUNDS_MS[-1]


def difference(after: Sequence[int], before: Sequence[int]) -> list[int]:
    """Counts added between two snapshots (a missing or differently sized `before`: all of `after`)."""
    if len(before) != len(after):
        return list(after)
    return [a - b for a, b in zip(after, before)]
