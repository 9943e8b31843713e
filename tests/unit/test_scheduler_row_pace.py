"""What the scheduler publishes about how its rows free (the router's wait estimate reads it):
`mean_output_tokens` over finished sequences and `min_remaining_steps()` over running ones.
Driven through schedule/postprocess as the worker drives it, with the model replaced by a fixed
token (the scheduler never runs kernels)."""
from __future__ import annotations

import pytest

from replica.blocks import BlockPool
from replica.sampling_params import SamplingParams
from replica.scheduler import OUTPUT_EMA, Scheduler
from replica.sequence import Sequence


def _scheduler() -> Scheduler:
    return Scheduler(BlockPool(64, 4), max_rows=8, max_decode_rows=8, max_seq_len=64,
                     step_token_budget=64, eos_token_ids=[0])


def _submit(sch: Scheduler, rid: str, max_tokens: int) -> Sequence:
    seq = Sequence(rid, [5, 6, 7], SamplingParams(max_tokens=max_tokens, ignore_eos=True), seed=0)
    sch.submit(seq)
    return seq


def _step(sch: Scheduler) -> list:
    batch = sch.schedule([])
    return sch.postprocess(batch, [9] * len(batch.sampled))


def test_min_remaining_steps_is_the_soonest_running_end_and_mean_output_follows_finishes():
    sch = _scheduler()
    assert sch.min_remaining_steps() == 0 and sch.mean_output_tokens == 0.0
    seqs = [_submit(sch, rid, n) for rid, n in (("a", 3), ("b", 6), ("c", 10))]
    _step(sch)                                       # prefill: every sequence has its first token
    assert sch.min_remaining_steps() == 3 - 1
    finished = []
    while sch.has_work():
        finished += [e.request_id for e in _step(sch) if e.finish_reason]
        running = [s for s in seqs if s.request_id in sch.running]
        assert sch.min_remaining_steps() == min((s.params.max_tokens - s.generated for s in running), default=0)
    assert finished == ["a", "b", "c"]
    m = 3.0
    for n in (6, 10):
        m += (n - m) * OUTPUT_EMA
    assert sch.mean_output_tokens == pytest.approx(m)


def test_aborted_sequences_do_not_count_as_finished_lengths():
    sch = _scheduler()
    _submit(sch, "a", 4)
    _submit(sch, "b", 40)
    _step(sch)
    sch.abort("b")
    while sch.has_work():
        _step(sch)
    assert sch.mean_output_tokens == 4.0


def test_max_seq_len_bounds_the_remaining_steps():
    sch = Scheduler(BlockPool(64, 4), max_rows=8, max_decode_rows=8, max_seq_len=10,
                    step_token_budget=64, eos_token_ids=[0])
    _submit(sch, "a", 1000)                          # 3 prompt tokens: at most 7 outputs
    _step(sch)
    assert sch.min_remaining_steps() == 10 - 4
