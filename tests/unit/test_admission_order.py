"""Admission order (EngineConfig.admission_order): requests drained from the inbox at one step are
admitted longest max_tokens first; across steps, in order of arrival. Driven through
schedule/postprocess as the worker drives it, the model replaced by a fixed token."""
from __future__ import annotations

import pytest

from replica.blocks import BlockPool
from replica.config import ConfigError, EngineConfig
from replica.sampling_params import SamplingParams
from replica.scheduler import Scheduler
from replica.sequence import Sequence


def _scheduler(longest_first: bool, rows: int = 8, budget: int = 64) -> Scheduler:
    return Scheduler(BlockPool(256, 4), max_rows=rows, max_decode_rows=rows, max_seq_len=128,
                     step_token_budget=budget, eos_token_ids=[0], longest_first=longest_first)


def _submit(sch: Scheduler, rid: str, max_tokens: int, prompt_len: int = 3) -> None:
    sch.submit(Sequence(rid, list(range(5, 5 + prompt_len)),
                        SamplingParams(max_tokens=max_tokens, ignore_eos=True), seed=0))


def _step(sch: Scheduler) -> list[str]:
    """One step; returns the ids admitted in it, in order."""
    batch = sch.schedule([])
    sch.postprocess(batch, [9] * len(batch.sampled))
    return [s.request_id for s in batch.admitted]


@pytest.mark.parametrize("longest_first, order", [(True, ["b", "c", "d", "a"]), (False, ["a", "b", "c", "d"])])
def test_one_steps_arrivals_are_admitted_longest_first(longest_first, order):
    sch = _scheduler(longest_first)
    for rid, n in (("a", 3), ("b", 10), ("c", 6), ("d", 6)):      # c and d tie: arrival order
        _submit(sch, rid, n)
    assert _step(sch) == order


def test_across_steps_the_order_is_arrival():
    """One row: a short request that arrived a step before a long one is admitted first."""
    sch = _scheduler(True, rows=1)
    _submit(sch, "x", 4)
    assert _step(sch) == ["x"]
    _submit(sch, "short", 2)
    _step(sch)                                       # drained; waits for x's row
    _submit(sch, "long", 20)
    admitted = []
    while sch.has_work():
        admitted += _step(sch)
    assert admitted == ["short", "long"]


def _burst_steps(longest_first: bool) -> int:
    """Steps to finish 8 requests submitted together, shortest first, when the token budget
    (12, less a token per decode row) admits their 4-token prompts over 3-4 steps: whichever go
    last start late, so the longest should not be among them."""
    sch = _scheduler(longest_first, budget=12)
    for i, n in enumerate((2, 4, 6, 8, 10, 12, 14, 16)):
        _submit(sch, f"r{i}", n, prompt_len=4)
    steps = 0
    while sch.has_work():
        _step(sch)
        steps += 1
    return steps


def test_longest_first_finishes_a_burst_in_fewer_steps():
    first, arrival = _burst_steps(True), _burst_steps(False)
    assert first < arrival


def test_admission_order_is_validated():
    with pytest.raises(ConfigError, match="admission_order"):
        EngineConfig(model="random:tiny", admission_order="shortest_first")
