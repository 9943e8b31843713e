"""Batch-size bucket arithmetic, shared by the router and anyone who reasons about padding.

Contract: a bucket list is a sorted sequence of unique positive ints (what `validate_buckets`
returns). A decode batch of `n` sequences runs in the smallest bucket `>= n` and replays
`bucket - n` padding rows; when `n` exceeds the largest bucket no captured graph fits and the
replica falls back (eager step or queueing, see `ReplicaStats.fallback`).

Pure functions over plain ints: no torch, no Ray, no I/O. The lookups assume a valid bucket list
and a batch size `n >= 1`; they raise `ValueError` for `n < 1` rather than guess.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Optional, Sequence


def validate_buckets(buckets: Iterable[int]) -> tuple[int, ...]:
    """Check a bucket list and return it as a tuple.

    Raises:
        ValueError: the list is empty, holds something other than positive ints, or is not
            sorted and unique; the message shows the corrected list where there is one.
    """
    try:
        b = tuple(buckets)
    except TypeError:
        raise ValueError(f"buckets={buckets!r} must be a list of positive integers, "
                         "e.g. [1, 2, 4, 8]") from None
    if not b or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b):
        raise ValueError(f"buckets={list(b)} must be a non-empty list of positive integers, "
                         "e.g. [1, 2, 4, 8]")
    if list(b) != sorted(set(b)):
        raise ValueError(f"buckets={list(b)} must be sorted and unique: use {sorted(set(b))}")
    return b


def bucket_for(n: int, buckets: Sequence[int]) -> Optional[int]:
    """Smallest bucket that holds a batch of `n` sequences, or None when `n` exceeds them all.

    Args:
        n: batch size, at least 1.
        buckets: a valid bucket list (sorted, unique, positive).

    Raises:
        ValueError: `n < 1` (an empty batch has no bucket).
    """
    if n < 1:
        raise ValueError(f"batch size n={n} must be at least 1")
    i = bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def padding_waste(n: int, buckets: Sequence[int]) -> Optional[int]:
    """Padding rows a batch of `n` replays in its bucket: `bucket_for(n) - n`, or None."""
    b = bucket_for(n, buckets)
    return None if b is None else b - n
