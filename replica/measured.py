"""A rate the engine measures for the router: the median of its last few samples.

Contract: `Measured.add(sample)` records one positive finite sample (others are ignored);
`Measured.value` is the median of the last `WINDOW` samples once `MIN_SAMPLES` have arrived,
else 0.0, which the router reads as "not measured here" (it then uses the fleet's median, then
its default: router/estimate.py `prefill_rate`, `step_time`).

Why a median and a minimum count, not a moving average seeded by the first sample: one step
timed while the host ran something else (another replica on the same cores, a GC pause, a
first-use allocation) can be many times off, and as the first value of a moving average it
decides routings until enough samples dilute it. In CI one replica published 3.3k prompt
tokens/s beside the other's 78k, and the router sent a follow-up chat turn away from its 1,100
cached tokens (tests/integration/test_multi_turn_affinity.py). That sample was mostly a timing
bug (on CPU a step was charged the next step's time: replica/worker.py `EngineCore._account`),
but the lesson holds for real outliers: a median of nine ignores up to four of them and follows a
real change of rate within five samples.
"""
from __future__ import annotations

import math
from collections import deque
from statistics import median

WINDOW = 9        # samples kept
MIN_SAMPLES = 3   # samples before a value is published


class Measured:
    """Median of the last `WINDOW` samples; 0.0 until `MIN_SAMPLES` have been added."""

    __slots__ = ("_samples", "_value")

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=WINDOW)
        self._value: float | None = 0.0   # None: stale (the engine reads it once per step)

    def add(self, sample: float) -> None:
        if sample > 0 and math.isfinite(sample):
            self._samples.append(sample)
            self._value = None

    @property
    def count(self) -> int:
        return len(self._samples)

    @property
    def value(self) -> float:
        if self._value is None:
            self._value = median(self._samples) if len(self._samples) >= MIN_SAMPLES else 0.0
        return self._value
