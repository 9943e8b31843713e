"""replica/measured.py: the rates the router reads are medians of recent samples, published only
once a few samples exist, so one step timed while the host was busy cannot decide a routing."""
from __future__ import annotations

import math
import random
import statistics

from replica.measured import MIN_SAMPLES, WINDOW, Measured


def test_nothing_is_published_before_min_samples():
    m = Measured()
    for k in range(MIN_SAMPLES - 1):
        m.add(10.0 + k)
        assert m.value == 0.0
    m.add(12.5)
    assert m.value == statistics.median([10.0 + k for k in range(MIN_SAMPLES - 1)] + [12.5])


def test_a_slow_first_sample_does_not_move_the_value():
    """The CI failure: a first sample 20x off seeded a moving average; the median ignores it."""
    m = Measured()
    for x in [3_300.0] + [78_000.0 + 1_000 * k for k in range(MIN_SAMPLES)]:
        m.add(x)
    assert 78_000.0 <= m.value <= 78_000.0 + 1_000 * MIN_SAMPLES


def test_the_value_is_the_median_of_the_last_window_and_follows_a_change():
    rng = random.Random(3)
    m, seen = Measured(), []
    for x in [rng.uniform(1, 2) for _ in range(2 * WINDOW)] + [rng.uniform(5, 6) for _ in range(WINDOW)]:
        m.add(x)
        seen.append(x)
        if len(seen) >= MIN_SAMPLES:
            assert m.value == statistics.median(seen[-WINDOW:])
    assert 5 <= m.value <= 6 and m.count == WINDOW


def test_bad_samples_are_ignored():
    m = Measured()
    for x in (0.0, -1.0, math.nan, math.inf, 2.0, 2.0, 4.0):
        m.add(x)
    assert m.count == 3 and m.value == 2.0
