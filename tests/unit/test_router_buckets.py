"""Bucket arithmetic (router/buckets.py): the smallest captured bucket that holds a batch, its
padding, and the validation that names what to fix in a bad bucket list."""
from __future__ import annotations

import pytest

from router.buckets import bucket_for, padding_waste, validate_buckets


@pytest.mark.parametrize("n, expected", [(1, 1), (3, 4), (4, 4), (5, 8), (8, 8), (9, None)])
def test_bucket_for_picks_smallest_fitting_bucket(n, expected):
    assert bucket_for(n, (1, 2, 4, 8)) == expected


def test_padding_waste():
    assert padding_waste(5, (1, 2, 4, 8)) == 3
    assert padding_waste(20, (16, 32, 64)) == 12
    assert padding_waste(65, (16, 32, 64)) is None


def test_bucket_for_rejects_empty_batch():
    with pytest.raises(ValueError, match="at least 1"):
        bucket_for(0, (1, 2))


@pytest.mark.parametrize("bad, fix", [([4, 2, 2], r"use \[2, 4\]"), ([], "non-empty"),
                                      ([0, 1], "positive"), ([1.5], "positive"),
                                      ([True], "positive"), (None, "list of positive")])
def test_validate_buckets_says_what_to_fix(bad, fix):
    with pytest.raises(ValueError, match=fix):
        validate_buckets(bad)


def test_validate_buckets_returns_tuple():
    assert validate_buckets([1, 2, 4]) == (1, 2, 4)
