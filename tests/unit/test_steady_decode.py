"""The scheduler's steady-state path (`Scheduler._repeat_decode`) and its packed events.

`_repeat_decode` builds a decode batch from the last one with array arithmetic instead of the
general per-row plan. It must be invisible: driven through the same scripted load (arrivals,
aborts, EOS stops, length limits, block-boundary crossings, preemption under a small pool), a
scheduler with it and one without produce the same batches, column for column, and the same
events. The model is replaced by a token that depends only on the sequence and its output index,
so both runs see the same tokens.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from replica.batch import DecodeRows
from replica.blocks import BlockPool
from replica.sampling_params import SamplingParams
from replica.scheduler import Scheduler
from replica.sequence import Event, Sequence, Status, StepEvents
from replica.steady_decode import LOGPROBS, advance

EOS = 0


def _token(seq: Sequence) -> int:
    """The 'sampled' token of `seq`'s next output: a function of its id and output index only."""
    return (len(seq.output_ids) * 13 + int(seq.request_id[1:]) * 7 + 5) % 97


def _describe(batch) -> tuple:
    d, c = batch.decode, batch.chunks
    return ([s.request_id for s in d.seqs], d.cols.tolist(), [s.request_id for s in c.seqs], c.q_lens,
            c.slots, c.positions, [s.request_id for s in batch.admitted], batch.greedy, batch.logprobs)


def _drive(seed: int, fast: bool, num_blocks: int, steps: int = 160):
    """Run a seeded script; returns (per-step record, how many batches the steady path built)."""
    sch = Scheduler(BlockPool(num_blocks, 4), max_rows=12, max_decode_rows=12, max_seq_len=48,
                    step_token_budget=24, eos_token_ids=[EOS])
    repeated = 0
    general = sch._repeat_decode

    def counted():
        nonlocal repeated
        batch = general() if fast else None
        repeated += batch is not None
        return batch
    sch._repeat_decode = counted
    rng = random.Random(seed)
    record, inflight, n = [], None, 0
    for k in range(steps):
        if k % 23 == 0 or (k > 60 and rng.random() < 0.04):       # arrivals in waves, then a trickle
            for _ in range(rng.randint(1, 6)):
                prompt = [rng.randrange(1, 97) for _ in range(rng.randint(2, 11))]
                params = SamplingParams(max_tokens=rng.randint(3, 40), ignore_eos=rng.random() < 0.5)
                sch.submit(Sequence(f"r{n}", prompt, params, seed=n))
                n += 1
        if rng.random() < 0.03 and sch.running:                  # a client goes away
            sch.abort(rng.choice(sorted(sch.running)))
        events = StepEvents()
        batch = sch.schedule(events.other)
        record.append(_describe(batch))
        if inflight is not None:
            sch.postprocess(inflight, [_token(s) for s in inflight.sampled], None, events)
        inflight = batch if batch else None
        record.append(sorted(events))
    return record, repeated, sch.counters["preemptions"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_blocks", [200, 40])
def test_steady_path_builds_what_the_general_plan_builds(seed, num_blocks):
    fast, repeated, preempted = _drive(seed, True, num_blocks)
    slow, none, _ = _drive(seed, False, num_blocks)
    assert none == 0
    assert repeated >= 20, f"the steady path ran only {repeated} times: the script does not exercise it"
    if num_blocks == 40:
        assert preempted > 0, "the small pool was meant to force preemptions"
    for k, (a, b) in enumerate(zip(fast, slow)):
        assert a == b, f"record {k} differs"


def test_steady_path_gives_each_row_its_own_last_output_and_enters_new_blocks():
    sch = Scheduler(BlockPool(64, 4), max_rows=4, max_decode_rows=4, max_seq_len=64,
                    step_token_budget=64, eos_token_ids=[EOS])
    seqs = [Sequence(f"s{i}", [5, 6, 7][: i + 1], SamplingParams(max_tokens=30, ignore_eos=True), seed=i)
            for i in range(3)]
    for s in seqs:
        sch.submit(s)
    first = sch.schedule([])                            # prefill of all three
    second = sch.schedule([])                           # their first decode rows (general plan)
    sch.postprocess(first, [9, 9, 9])
    third = sch.schedule([])                            # same rows: the steady path
    assert sch._repeatable is not None and sch._repeatable[0] is third
    tokens, src, positions, rows, slots, steps = third.decode.cols
    assert src.tolist() == [0, 1, 2]                    # row j feeds what row j sampled last step
    assert (positions == second.decode.cols[2] + 1).all() and (steps == second.decode.cols[5] + 1).all()
    for seq, p, slot in zip(third.decode.seqs, positions.tolist(), slots.tolist()):
        assert slot == seq.block_table[p // 4] * 4 + p % 4   # s2 enters its second block here
        assert seq.num_computed == p + 1 and seq.pending == 2


def test_postprocess_packs_plain_tokens_and_keeps_the_rest_whole():
    sch = Scheduler(BlockPool(64, 4), max_rows=4, max_decode_rows=4, max_seq_len=64,
                    step_token_budget=64, eos_token_ids=[EOS])
    plain = Sequence("p", [5, 6], SamplingParams(max_tokens=8, ignore_eos=True), seed=0)
    stops = Sequence("e", [5, 6], SamplingParams(max_tokens=8), seed=1)
    short = Sequence("l", [5, 6], SamplingParams(max_tokens=1, ignore_eos=True), seed=2)
    for s in (plain, stops, short):
        sch.submit(s)
    events = sch.postprocess(sch.schedule([]), [11, EOS, 12])
    assert (events.ids, events.tokens) == (["p"], [11])
    assert sorted(events.other) == [Event("e", (EOS,), "stop", True), Event("l", (12,), "length")]
    assert sorted(events) == sorted(events.expand()) and len(events) == 3
    assert StepEvents(events.ids, events.tokens, events.other).expand()[0] == Event("p", (11,))


def test_rows_that_finish_or_reach_their_limit_leave_the_steady_path_without_replanning():
    """A finish (EOS), an abort and a row at max_tokens drop those rows from the steady batch;
    the rows that stay keep the steady path, fed from their rows in the step before."""
    sch = Scheduler(BlockPool(64, 4), max_rows=4, max_decode_rows=4, max_seq_len=64,
                    step_token_budget=64, eos_token_ids=[EOS])
    limits = {"a": 30, "b": 4, "c": 30, "d": 30}          # b stops at its limit; c on EOS; d aborted
    for i, (rid, m) in enumerate(limits.items()):
        sch.submit(Sequence(rid, [5, 6, 7], SamplingParams(max_tokens=m, ignore_eos=rid != "c"), seed=i))
    planned = []
    general = sch._plan
    sch._plan = lambda batch: planned.append(len(batches)) or general(batch)
    batches, inflight = [], None
    for k in range(12):
        if k == 7:
            sch.abort("d")
        batch = sch.schedule([])
        batches.append(batch)
        if inflight is not None:
            sch.postprocess(inflight, [EOS if s.request_id == "c" and len(s.output_ids) == 5 else 3
                                       for s in inflight.sampled])
        inflight = batch
    rows = [[s.request_id for s in b.decode.seqs] for b in batches]
    assert planned == [0, 1], f"only the prefill and the first decode step are planned: {planned}"
    assert rows[4] == ["a", "c", "d"] and rows[8] == ["a"]          # b, then c and d, left
    for prev, cur in zip(batches[2:], batches[3:]):
        before = [s.request_id for s in prev.decode.seqs]
        assert cur.decode.cols[1].tolist() == [before.index(s.request_id) for s in cur.decode.seqs]
    assert sch.running.keys() == {"a"}


def test_a_row_at_its_limit_leaves_the_batch():
    sch = Scheduler(BlockPool(64, 4), max_rows=2, max_decode_rows=2, max_seq_len=64,
                    step_token_budget=64, eos_token_ids=[EOS])
    for i, m in enumerate((4, 30)):
        sch.submit(Sequence(f"s{i}", [5, 6], SamplingParams(max_tokens=m, ignore_eos=True), seed=i))
    inflight, finished = None, []
    for _ in range(8):
        batch = sch.schedule([])
        if inflight is not None:
            finished += [e.request_id for e in sch.postprocess(inflight, [3] * len(inflight.sampled))
                         if e.finish_reason]
        inflight = batch
        if len(batch.decode):                       # never a row past max_tokens
            steps = batch.decode.cols[5]
            assert np.all(steps < np.array([s.params.max_tokens for s in batch.decode.seqs]))
    assert finished == ["s0"]


def test_a_batch_read_back_before_the_next_schedule_is_planned_in_full():
    """The steady path assumes the last batch is still in flight (its tokens on the device). A
    caller that reads it back first (tests, `replay_vs_eager`) gets known tokens and src -1."""
    sch = Scheduler(BlockPool(64, 4), max_rows=2, max_decode_rows=2, max_seq_len=64,
                    step_token_budget=64, eos_token_ids=[EOS])
    for i in range(2):
        sch.submit(Sequence(f"s{i}", [5, 6], SamplingParams(max_tokens=30, ignore_eos=True), seed=i))
    sch.postprocess(sch.schedule([]), [11, 12])
    second = sch.schedule([])
    sch.postprocess(second, [21, 22])
    third = sch.schedule([])
    tokens, src = third.decode.cols[:2].tolist()
    assert src == [-1, -1] and tokens == [21, 22]


def test_advance_drops_leaving_rows_with_their_params_and_leaves_the_last_step_alone():
    """`steady_decode.advance` on hand-made columns: a row at max_tokens, a row at max_seq_len
    and a finished row leave, with their params (here the only logprobs row); the rest move one
    position on and feed from their old rows."""
    seqs = [Sequence(f"s{i}", [5, 6], SamplingParams(max_tokens=9, ignore_eos=True), seed=i) for i in range(4)]
    for s in seqs:
        s.status = Status.RUNNING
    seqs[3].status = Status.FINISHED
    #             tokens       src            positions       rows          slots           steps
    cols = np.array([[7, 7, 7, 7], [-1, -1, -1, -1], [4, 5, 14, 6], [0, 1, 2, 3], [40, 53, 86, 70], [2, 8, 3, 4]])
    params = np.array([[9, 9, 9, 9], [1, 1, 1, 1], [0, 1, 0, 0]])     # s1 wants logprobs
    prev = DecodeRows(seqs, cols)
    kept_cols = cols.copy()
    assert advance(prev, params, max_seq_len=16, check_status=False)[0] == [seqs[0], seqs[3]]
    out_seqs, out_cols, out_params = advance(prev, params, max_seq_len=16, check_status=True)
    assert out_seqs == [seqs[0]]                       # s1 at max_tokens, s2 at max_seq_len, s3 done
    assert out_cols[:, 0].tolist() == [0, 0, 5, 0, 41, 3]
    assert out_params.tolist() == [[9], [1], [0]] and not out_params[LOGPROBS].any()
    assert (prev.cols == kept_cols).all()
    assert advance(DecodeRows(seqs[1:3], cols[:, 1:3]), params[:, 1:3], 16, check_status=False) is None
