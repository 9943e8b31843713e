"""Admission order (EngineConfig.admission_window_s): the next admission is the waiting sequence
with the most output left among those that arrived within the window of the oldest one waiting;
a window of 0 is arrival order. Driven through schedule/postprocess as the worker drives it, the
model replaced by a fixed token and the clock by a variable."""
from __future__ import annotations

import pytest

from replica.blocks import BlockPool
from replica.config import ConfigError, EngineConfig
from replica.sampling_params import SamplingParams
from replica.scheduler import Scheduler
from replica.sequence import Sequence


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _scheduler(window_s: float, rows: int = 8, budget: int = 64, clock=None) -> Scheduler:
    return Scheduler(BlockPool(256, 4), max_rows=rows, max_decode_rows=rows, max_seq_len=128,
                     step_token_budget=budget, eos_token_ids=[0], window_s=window_s, clock=clock or Clock())


def _submit(sch: Scheduler, rid: str, max_tokens: int, prompt_len: int = 3) -> None:
    sch.submit(Sequence(rid, list(range(5, 5 + prompt_len)),
                        SamplingParams(max_tokens=max_tokens, ignore_eos=True), seed=0))


def _step(sch: Scheduler) -> list[str]:
    """One step; returns the ids admitted in it, in order."""
    batch = sch.schedule([])
    sch.postprocess(batch, [9] * len(batch.sampled))
    return [s.request_id for s in batch.admitted]


def _run(sch: Scheduler) -> list[str]:
    admitted = []
    while sch.has_work():
        admitted += _step(sch)
    return admitted


@pytest.mark.parametrize("window_s, order", [(2.0, ["b", "c", "d", "a"]), (0.0, ["a", "b", "c", "d"])])
def test_the_longest_output_in_the_window_is_admitted_first(window_s, order):
    sch = _scheduler(window_s)
    for rid, n in (("a", 3), ("b", 10), ("c", 6), ("d", 6)):      # c and d tie: arrival order
        _submit(sch, rid, n)
    assert _step(sch) == order


def test_arrivals_past_the_window_wait_for_older_ones():
    """One row. "short" waits from t=0; "long" (t=1) is inside its 2 s window and overtakes it,
    "later" (t=3) is not, however long its output."""
    clock = Clock()
    sch = _scheduler(2.0, rows=1, clock=clock)
    _submit(sch, "x", 4)
    assert _step(sch) == ["x"]
    _submit(sch, "short", 2)
    _step(sch)                                       # drained; waits for x's row
    clock.now = 1.0
    _submit(sch, "long", 20)
    clock.now = 3.0
    _submit(sch, "later", 60)
    assert _run(sch) == ["long", "short", "later"]


def test_a_burst_reaching_the_scheduler_over_several_steps_is_ordered_as_a_whole():
    """Twelve requests arrive two per step, shortest first, on two rows: every admission is the
    longest output of all that were submitted and not yet admitted, whichever step they came in."""
    sch = _scheduler(2.0, rows=2)
    todo, waiting, order = list(range(2, 14)), set(), []
    while todo or sch.has_work():
        for n in todo[:2]:
            _submit(sch, f"n{n}", n)
            waiting.add(n)
        del todo[:2]
        for rid in _step(sch):
            n = int(rid[1:])
            assert n == max(waiting), (rid, sorted(waiting))
            waiting.remove(n)
            order.append(n)
    assert sorted(order) == list(range(2, 14)) and order != sorted(order)


def _burst_steps(window_s: float, per_step: int) -> int:
    """Steps to finish 12 requests submitted `per_step` a step, shortest first, when the token
    budget (12, less a token per decode row) admits their 4-token prompts over several steps."""
    sch = _scheduler(window_s, budget=12, rows=16)
    lengths = [2 + 2 * i for i in range(12)]
    steps = 0
    while lengths or sch.has_work():
        for n in lengths[:per_step]:
            _submit(sch, f"r{n}", n, prompt_len=4)
        del lengths[:per_step]
        _step(sch)
        steps += 1
    return steps


@pytest.mark.parametrize("per_step", [12, 4])
def test_longest_first_finishes_a_burst_in_fewer_steps(per_step):
    assert _burst_steps(2.0, per_step) < _burst_steps(0.0, per_step)


def test_preempted_sequences_count_the_output_they_have_left():
    sch = _scheduler(2.0)
    _submit(sch, "a", 10)
    _submit(sch, "b", 8)
    assert _step(sch) == ["a", "b"]
    for _ in range(5):
        _step(sch)                                   # a has 6 tokens, 4 left; b 2 left
    a, b = sch.running["a"], sch.running["b"]
    for seq in (b, a):
        sch._preempt(seq)
    _submit(sch, "c", 3)                             # 3 left, arrived last
    assert _step(sch) == ["a", "c", "b"]             # arrival order: a, b, c


def test_admission_window_is_validated():
    with pytest.raises(ConfigError, match="admission_window_s"):
        EngineConfig(model="random:tiny", admission_window_s=-1.0)
