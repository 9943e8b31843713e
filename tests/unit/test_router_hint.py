"""router/hint.py: checking a caller's RoutingHint and reducing it to a Batch."""
from __future__ import annotations

import pytest
from router_fakes import job, no_ray_init, tokens  # noqa: F401 (no_ray_init: autouse)

from router.hint import MAX_COUNT, MAX_HINT_DEPTHS, MAX_HINT_PROMPTS, Batch, batch_of, coerce_hint
from router.stats import RoutingHint


@pytest.mark.parametrize("raw, expected", [
    (RoutingHint(3, 100), RoutingHint(3, 100)),
    ({"num_sequences": 3, "max_total_tokens": 100}, RoutingHint(3, 100)),
    ({"num_sequences": 3}, None), ({"num_sequences": 0, "max_total_tokens": 5}, None),
    ({"num_sequences": 2.5, "max_total_tokens": 5}, None),
    ({"num_sequences": "2", "max_total_tokens": 5}, None),
    ({"num_sequences": True, "max_total_tokens": 5}, None),
    (RoutingHint(-1, 5), None), ("2x100", None), (42, None), (None, None)])
def test_coerce_hint_accepts_instances_and_dicts_only_when_valid(raw, expected):
    assert coerce_hint(raw) == expected


def test_version_2_fields_survive_from_a_dict():
    raw = {"num_sequences": 4, "max_total_tokens": 300, "prompt_tokens": 800, "max_new_tokens": 400,
           "prefix_hashes": [[[1, 11], [2, 12]], [[1, 21]]], "samples_per_prompt": 2}
    assert coerce_hint(raw) == RoutingHint(4, 300, 800, 400, (((1, 11), (2, 12)), ((1, 21),)), 2)


@pytest.mark.parametrize("field, bad, default", [
    ("prompt_tokens", -5, 0), ("prompt_tokens", 1.5, 0), ("prompt_tokens", "9", 0),
    ("max_new_tokens", float("nan"), 0), ("max_new_tokens", True, 0),
    ("samples_per_prompt", 0, 1), ("samples_per_prompt", None, 1),
    ("prefix_hashes", "abc", ()), ("prefix_hashes", 7, ()), ("prefix_hashes", None, ())])
def test_a_bad_optional_field_falls_back_alone(field, bad, default):
    h = coerce_hint({"num_sequences": 2, "max_total_tokens": 50, field: bad})
    assert h is not None and getattr(h, field) == default and h.num_sequences == 2


def test_malformed_prefix_pairs_are_skipped_one_by_one():
    raw = [[(1, 5), (0, 6), (2, "x"), (3,), None, (4, 8), (True, 9)], 17, "ab", [(1, 2.0)]]
    h = coerce_hint({"num_sequences": 4, "max_total_tokens": 50, "prefix_hashes": raw})
    assert h.prefix_hashes == (((1, 5), (4, 8)), (), (), ())


def test_prefix_summaries_are_bounded():
    prompt = [(d, d) for d in range(1, MAX_HINT_DEPTHS + 50)]
    h = coerce_hint({"num_sequences": 1, "max_total_tokens": 5,
                     "prefix_hashes": (prompt for _ in range(MAX_HINT_PROMPTS + 3))})  # a generator
    assert len(h.prefix_hashes) == MAX_HINT_PROMPTS
    assert all(len(p) == MAX_HINT_DEPTHS for p in h.prefix_hashes)


def test_batch_from_an_ingress_hint():
    h = job([tokens(1, 100), tokens(2, 300)], max_tokens=50, n=3)
    b = batch_of(h)
    assert b == Batch(sequences=6, prompt_tokens=1200, decode_steps=49,
                      prompts=h.prefix_hashes, samples_per_prompt=3)
    assert [d for d, _ in h.prefix_hashes[1]] == [1, 2, 4, 8, 16, 18]   # 300 tokens = 18 full blocks


@pytest.mark.parametrize("h, steps", [
    (RoutingHint(4, 1000), 999),                                 # version 1: the whole budget
    (RoutingHint(4, 1000, prompt_tokens=2400), 399),             # mean prompt 600 -> 400 new
    (RoutingHint(4, 1000, prompt_tokens=2400, max_new_tokens=4), 0),  # one token: prefill only
    (RoutingHint(3, 100, max_new_tokens=10), 3)])                 # ceil(10 / 3) = 4 new
def test_decode_steps_of_the_longest_sequence(h, steps):
    assert batch_of(h).decode_steps == steps


def test_batch_counts_are_clamped():
    b = batch_of(RoutingHint(10**30, 10**40, prompt_tokens=10**50, max_new_tokens=10**60))
    assert b.sequences == b.prompt_tokens == MAX_COUNT and 0 <= b.decode_steps <= MAX_COUNT
