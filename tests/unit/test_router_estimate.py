"""router/estimate.py: when a batch's first and last token would arrive at one replica."""
from __future__ import annotations

import math

import pytest
from router_fakes import BLOCK, cached, hint, job, no_ray_init, stats, tokens  # noqa: F401

from router.estimate import (DEFAULT_PREFILL_TOKENS_PER_S, EAGER_STEP_FACTOR, MAX_STEP_S,
                             MIN_WAIT_STEPS, NO_PRIOR, Prior, _default_step, cached_tokens,
                             estimate, fleet_prior, prefill_rate, queued_prefill, row_limit, score,
                             step_time)
from router.hint import batch_of
from router.inflight import Outstanding

SHARED = tokens(0, 64)   # a 4-block system prompt


def measured(**kw):
    """A [1, 2, 4, 8] replica with measured rates and 64 rows of paged KV."""
    base = dict(decode_step_s={1: 0.010, 4: 0.012, 8: 0.016}, prefill_tokens_per_s=10_000.0,
                max_num_seqs=64, block_size=BLOCK, total_blocks=1000, free_blocks=900)
    return stats((1, 2, 4, 8), **{**base, **kw})


def test_the_formula_on_a_worked_example():
    """2 prompts of 96 tokens sharing a 64-token prefix the replica holds; 2 rows running, a
    20,000-token backlog at 10,000 tokens/s; 21 new tokens each (20 decode steps)."""
    s = measured(running=2, free_slots=62, prefill_backlog_tokens=20_000, prefix_hashes=cached(SHARED))
    b = batch_of(job([SHARED + tokens(1, 32), SHARED + tokens(2, 32)], max_tokens=21))
    e = estimate(b, s)
    assert e.prefill_tokens == 192 - 128                       # 4 cached blocks per prompt
    assert (e.rows, e.bucket, e.padding, e.waves) == (4, 4, 0, 1)
    assert e.first_token_s == pytest.approx(20_000 / 10_000 + 64 / 10_000)
    assert e.last_token_s == pytest.approx(e.first_token_s + 20 * 0.012)
    assert score(e, b) == pytest.approx(e.last_token_s + e.first_token_s / 2)


# --- decode step time -----------------------------------------------------------------------------

def test_step_time_uses_measured_buckets_and_interpolates_between_them():
    s = measured()
    assert step_time(s, 3) == (pytest.approx(0.012), 4)     # 3 rows replay bucket 4: padding costs
    assert step_time(s, 2) == (pytest.approx(0.010 + 0.002 / 3), 2)


def test_past_the_largest_bucket_a_graph_replica_pays_eager_steps():
    s = measured()
    t, bucket = step_time(s, 9)
    assert bucket is None
    assert t == pytest.approx(EAGER_STEP_FACTOR * 0.016 * _default_step(9) / _default_step(8))
    cpu = measured(graphs=False)                             # its measured steps are eager already
    assert step_time(cpu, 9)[0] == pytest.approx(t / EAGER_STEP_FACTOR)


def test_unmeasured_step_times_come_from_the_fleet_then_from_the_default_curve():
    fresh = stats((1, 2, 4, 8))
    prior = fleet_prior([measured(), measured(decode_step_s={4: 0.020}), fresh])
    assert prior.step_s == {1: 0.010, 4: pytest.approx(0.016), 8: 0.016}   # medians per bucket
    assert step_time(fresh, 4, prior)[0] == pytest.approx(0.016)
    assert step_time(fresh, 4)[0] == pytest.approx(_default_step(4))
    one_point = measured(decode_step_s={8: 0.016})             # the default curve's shape, scaled
    assert step_time(one_point, 1)[0] == pytest.approx(0.016 * _default_step(1) / _default_step(8))


def test_bad_step_entries_count_as_unmeasured():
    s = measured(decode_step_s={1: float("nan"), 2: -1.0, 4: float("inf"), "8": 0.5, 8.0: 0.5})
    assert step_time(s, 1)[0] == pytest.approx(_default_step(1))
    assert step_time(measured(decode_step_s={4: 1e300}), 4)[0] == MAX_STEP_S


# --- prefill --------------------------------------------------------------------------------------

def test_prefill_rate_falls_back_from_own_to_fleet_to_default():
    assert prefill_rate(measured()) == 10_000.0
    assert prefill_rate(measured(prefill_tokens_per_s=0.0), Prior({}, 5_000.0)) == 5_000.0
    assert prefill_rate(measured(prefill_tokens_per_s=float("nan"))) == DEFAULT_PREFILL_TOKENS_PER_S


def test_cached_tokens_take_the_deepest_matching_depth_per_prompt():
    held = cached(SHARED + tokens(9, 64))                 # 8 blocks: depths 1, 2, 4, 8
    b = batch_of(job([SHARED + tokens(9, 64) + tokens(3, 100), SHARED + tokens(4, 80), tokens(5, 50)],
                     max_tokens=5))
    # prompt 1 matches depth 8 (128 tokens), prompt 2 depth 4 (its 9 blocks miss 8), prompt 3 none
    assert cached_tokens(b, measured(prefix_hashes=held)) == 128 + 64


def test_cached_tokens_count_every_sample_and_never_exceed_the_prompt_tokens():
    b = batch_of(job([SHARED], max_tokens=5, n=4))
    assert cached_tokens(b, measured(prefix_hashes=cached(SHARED))) == 4 * 64
    lying = b._replace(prompt_tokens=100)
    assert cached_tokens(lying, measured(prefix_hashes=cached(SHARED))) == 100


def test_recent_prefixes_count_as_cached_and_block_size_must_be_known():
    b = batch_of(job([SHARED + tokens(1, 10)], max_tokens=5))
    assert cached_tokens(b, measured()) == 0
    assert cached_tokens(b, measured(), recent={h for _, h in b.prompts[0]}) == 64
    assert cached_tokens(b, measured(block_size=0, prefix_hashes=cached(SHARED))) == 0


def test_a_version_1_hint_costs_no_prefill_and_its_whole_budget_in_steps():
    e = estimate(batch_of(hint(2, 100)), measured(prefill_backlog_tokens=5_000))
    assert e.prefill_tokens == 0 and e.first_token_s == pytest.approx(0.5)
    assert e.last_token_s == pytest.approx(0.5 + 99 * step_time(measured(), 2)[0])


# --- rows, admission, what the router sent -------------------------------------------------------

def test_recent_work_adds_to_the_stats_and_all_in_flight_bounds_rows_from_below():
    b = batch_of(hint(1, 10, prompt_tokens=100, max_new_tokens=10))
    s = measured(running=3, prefill_backlog_tokens=1_000)
    e = estimate(b, s, Outstanding(sequences=4, recent_sequences=2, recent_prompt_tokens=500))
    assert e.rows == 3 + 2 + 1 and e.first_token_s == pytest.approx((1_000 + 500 + 100) / 10_000)
    assert estimate(b, s, Outstanding(sequences=9)).rows == 10   # stats lag what it sent
    assert estimate(b, s, Outstanding(finished_sequences=2)).rows == 3 - 2 + 1   # done since
    assert estimate(b, s, Outstanding(finished_sequences=7)).rows == 1


@pytest.mark.parametrize("pending, sends, recent, age, left", [
    (10_000, (), 0, 0.5, 5_000),                        # the published backlog drains with age
    (10_000, (), 700, 2.0, 700),                        # ... to empty; unknown send times count whole
    (0, ((0.1, 3_000),), 3_000, 0.9, 0),                # sent long enough ago: prefilled by now
    (0, ((0.9, 3_000),), 3_000, 0.9, 3_000),            # sent just now: all of it waits
    (5_000, ((0.2, 3_000),), 3_000, 0.5, 3_000),        # FIFO: 5k - 2k + 3k at 0.2 s, less 3k since
    (0, ((0.0, 1_000), (0.5, 1_000)), 2_000, 0.55, 500),  # the first drained before the second came
])
def test_the_prefill_queue_drains_at_the_rate_since_the_stats(pending, sends, recent, age, left):
    ahead = Outstanding(recent_sequences=len(sends) or 1, recent_prompt_tokens=recent, recent_sends=sends)
    assert queued_prefill(pending, ahead, 10_000.0, age) == pytest.approx(left)


def test_a_replica_busy_only_with_prefills_done_since_its_stats_is_not_behind():
    """What the simulator showed (benchmarks/route_sim.py): 0.5 s after its stats, B "holds" 3.6k
    prompt tokens this router sent right after them (prefilled 0.4 s ago at 10k tokens/s), A
    published 2k queued just now. The turn goes to B, whose queue is empty."""
    b = batch_of(hint(1, 300, prompt_tokens=200, max_new_tokens=64))
    a_stats = measured(running=10, prefill_backlog_tokens=2_000)
    b_stats = measured(running=10, timestamp=a_stats.timestamp - 0.5)
    sent = Outstanding(sequences=4, recent_sequences=4, recent_prompt_tokens=3_600,
                       recent_sends=((0.01, 900), (0.02, 900), (0.03, 900), (0.04, 900)))
    on_a = estimate(b, a_stats)
    on_b = estimate(b, b_stats, sent, age_s=0.5)
    assert on_b.first_token_s == pytest.approx(200 / 10_000)
    assert on_a.first_token_s == pytest.approx((2_000 + 200) / 10_000)
    assert estimate(b, b_stats, sent._replace(recent_sends=()), age_s=0.5).first_token_s \
        == pytest.approx((3_600 + 200) / 10_000)                     # counted whole: B looked behind


def test_the_backlog_of_sequences_that_finished_since_the_stats_is_gone():
    """Back to back (a chat's next turn), the last snapshot still shows the previous turns
    prefilling; once this router saw them finish, their share of the backlog no longer counts."""
    b = batch_of(hint(1, 10, prompt_tokens=100, max_new_tokens=10))
    s = measured(running=4, prefill_backlog_tokens=4_000)
    assert estimate(b, s).first_token_s == pytest.approx((4_000 + 100) / 10_000)
    assert estimate(b, s, Outstanding(finished_sequences=1)).first_token_s == pytest.approx((3_000 + 100) / 10_000)
    assert estimate(b, s, Outstanding(finished_sequences=4)).first_token_s == pytest.approx(100 / 10_000)
    assert estimate(b, s, Outstanding(finished_sequences=9, recent_prompt_tokens=500)).first_token_s \
        == pytest.approx(600 / 10_000)


def test_past_the_row_limit_a_batch_waits_for_rows_to_free_at_the_measured_pace():
    """62 of 64 rows running, a 4-sequence batch: its last sequence needs 2 rows to free. Rows free
    at 64 / L per step, L the replica's mean output length (else the batch's own, 41)."""
    b = batch_of(hint(4, 50, prompt_tokens=40, max_new_tokens=4 * 41))    # 40 decode steps
    full = dict(running=62, max_num_seqs=64, free_slots=2)
    step = step_time(measured(**full), 64)[0]
    e = estimate(b, measured(**full, mean_output_tokens=96.0))
    assert (e.rows, e.waves) == (64, 2)
    assert e.first_token_s == pytest.approx(2 * 96 / 64 * step + 40 / 10_000)
    assert e.last_token_s == pytest.approx(e.first_token_s + 40 * step)
    assert estimate(b, measured(**full)).first_token_s == pytest.approx(2 * 41 / 64 * step + 40 / 10_000)


def test_no_row_frees_before_the_first_running_sequence_ends():
    """The published steps until the first running row ends bound the wait from below (a burst's
    rows all started together), less the steps run since the stats were taken."""
    b = batch_of(hint(1, 50, prompt_tokens=10, max_new_tokens=20))
    s = measured(running=64, max_num_seqs=64, free_slots=0, mean_output_tokens=64.0, min_remaining_steps=50)
    step = step_time(s, 64)[0]
    assert estimate(b, s).first_token_s == pytest.approx(50 * step + 10 / 10_000)
    assert estimate(b, s, age_s=20 * step).first_token_s == pytest.approx(30 * step + 10 / 10_000)
    flowing = estimate(b, s, age_s=60 * step)                       # it has ended since: the flow
    assert flowing.first_token_s == pytest.approx(1 * 64 / 64 * step + 10 / 10_000)


def test_a_long_queue_waits_in_proportion_to_it():
    """A replica with few rows and a queue: each sequence ahead costs L / rows steps, so a 64-
    sequence job behind a full 8-row replica waits as long as eight waves of L steps."""
    s = stats((1, 2, 4, 8), running=8, queued=0, max_num_seqs=8, free_slots=0, mean_output_tokens=60.0,
              decode_step_s={8: 0.005}, prefill_tokens_per_s=10_000.0)
    one = estimate(batch_of(hint(1, 50, max_new_tokens=60)), s)
    job64 = estimate(batch_of(hint(64, 50, max_new_tokens=64 * 60)), s)
    assert one.first_token_s == pytest.approx(60 / 8 * 0.005)
    assert job64.first_token_s == pytest.approx(64 * 60 / 8 * 0.005)
    assert (one.waves, job64.waves) == (2, 9)


def test_free_slots_and_free_blocks_gate_admission():
    b = batch_of(hint(2, 50, prompt_tokens=320, max_new_tokens=2))      # 1 step: waits MIN_WAIT_STEPS
    assert estimate(b, measured(free_slots=2)).waves == 1
    assert estimate(b, measured(free_slots=1)).waves == 2
    assert estimate(b, measured(free_slots=8), Outstanding(7, 7, 0)).waves == 2
    assert estimate(b, measured(free_blocks=22)).waves == 1            # 20 prompt + 2 growth blocks
    e = estimate(b, measured(free_blocks=21))
    assert e.waves == 2 and e.first_token_s >= MIN_WAIT_STEPS * step_time(measured(), 2)[0]


def test_queue_fallback_caps_rows_at_the_largest_bucket():
    assert row_limit(measured(fallback="queue")) == 8 and row_limit(measured()) == 64
    e = estimate(batch_of(hint(12, 50)), measured(fallback="queue"))
    assert (e.rows, e.bucket, e.waves) == (8, 8, 2)


# --- degenerate inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(prefill_tokens_per_s=0.0), dict(prefill_tokens_per_s=float("nan")),
    dict(prefill_tokens_per_s=float("inf")), dict(prefill_tokens_per_s=1e-300),
    dict(prefill_tokens_per_s="fast"), dict(decode_step_s={}), dict(decode_step_s=None),
    dict(decode_step_s={1: 1e300}), dict(prefill_backlog_tokens=10**400),
    dict(prefill_backlog_tokens=float("nan")), dict(prefill_backlog_tokens=-7),
    dict(running=10**30, max_num_seqs=10**40, free_slots=10**40),
    dict(block_size=-16), dict(block_size=10**30, free_blocks=-1), dict(prefix_hashes=None),
    dict(prefix_hashes=([1],)), dict(free_blocks="many")])
def test_degenerate_stats_give_finite_estimates(kw):
    b = batch_of(job([SHARED + tokens(1, 20)] * 3, max_tokens=50))
    e = estimate(b, measured(**kw), Outstanding(5, 2, 10**6), Prior({3: float("nan")}, float("nan")))
    assert all(math.isfinite(x) and x >= 0 for x in (e.first_token_s, e.last_token_s, score(e, b)))
    assert e.first_token_s <= e.last_token_s


def test_prior_of_nothing():
    assert fleet_prior([]) == NO_PRIOR


def test_a_gpu_neighbours_queue_comes_first_and_its_steps_interleave():
    """`shared` (replicas on the same GPU): their queued prefill seconds delay the first token, and
    their step adds to each decode step; device_load reads both off a neighbour's stats."""
    from router.estimate import Shared, device_load
    s = measured()
    b = batch_of(job([tokens(5, 100)], max_tokens=11))
    alone, beside = estimate(b, s), estimate(b, s, shared=Shared(prefill_s=0.5, step_s=0.02))
    assert beside.first_token_s == pytest.approx(alone.first_token_s + 0.5)
    assert beside.last_token_s - beside.first_token_s == pytest.approx(10 * (0.010 + 0.02))
    busy = measured(running=4, decode_rows=4, free_slots=60, prefill_backlog_tokens=5_000)
    load = device_load(busy)
    assert load.prefill_s == pytest.approx(5_000 / 10_000) and load.step_s == pytest.approx(0.012)
    assert device_load(measured()) == Shared(0.0, 0.0)
    full = device_load(measured(running=64, decode_rows=64, free_slots=0))   # rows full, no prefill queued
    assert full.prefill_s == 0.0 and full.step_s > 0.012       # its wait for a row is not GPU time
