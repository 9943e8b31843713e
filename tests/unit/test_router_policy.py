"""The pure routing policy (router/policy.py); bucket arithmetic is in test_router_buckets.py.

The estimate's own arithmetic is tested in test_router_estimate.py; here, that the ranking follows
it: the replica where the batch would finish first wins, near ties go to graph fit, the first
token, prefix affinity and padding, stale or missing stats rank after every usable replica.
Tie-break randomness and robustness to any input: test_router_policy_robustness.py.
"""
from __future__ import annotations

import random

import pytest
from router_fakes import (BLOCK, NOW, STALE, cached, hint, job,  # noqa: F401 (no_ray_init: autouse)
                          no_ray_init, rank, stats, tokens)

from router.estimate import score
from router.hint import batch_of
from router.inflight import Outstanding
from router.policy import GRAPH_FIT, NEAR_TIE_REL, NO_FIT, NO_HINT, NO_STATS, rank_replicas
from router.stats import ReplicaStats

LATENCY, THROUGHPUT, LADDER = (1, 2, 4, 8), (16, 32, 64), (1, 2, 4, 8, 16, 32, 64)
STEPS = {1: 0.0063, 2: 0.0063, 4: 0.0064, 8: 0.0065, 16: 0.0068, 32: 0.0072, 64: 0.0082}


def paged(buckets=LADDER, **kw):
    """A version-2 replica: measured H100-like steps for its buckets, 40k prompt tokens/s, paged KV
    sized for 256 rows, 16-token blocks."""
    base = dict(decode_step_s={b: STEPS[b] for b in buckets}, prefill_tokens_per_s=40_000.0,
                max_num_seqs=256, block_size=BLOCK, total_blocks=20_000, free_blocks=20_000)
    base.update(kw)
    base.setdefault("free_slots", base["max_num_seqs"] - base.get("running", 0))
    return stats(buckets, **base)


def scores(r, h):
    b = batch_of(h)
    return {k: score(e, b) for k, e in r.estimates.items()}


# --- ranking with a hint -------------------------------------------------------------------------

def test_graph_fit_beats_non_fit():
    # "small" holds 8 slots, all but one busy: a batch of 4 does not fit there now.
    cands = [("small", stats((1, 2, 4, 8), running=7)), ("big", stats((16, 32, 64), running=50))]
    r = rank(hint(4), cands)
    assert r.tiers == [["big"], ["small"]] and r.outcome == GRAPH_FIT


@pytest.mark.parametrize("n, first", [(5, "A"), (20, "B")])
def test_least_padding_waste_wins(n, first):
    # n=5: A pads 5->8 (3 rows), B pads 5->16 (11). n=20: A cannot hold 20, B pads 20->32.
    cands = [("A", stats((1, 2, 4, 8))), ("B", stats((16, 32, 64)))]
    r = rank(hint(n), cands)
    assert r.tiers[0] == [first] and r.outcome == GRAPH_FIT


def test_padding_counts_the_running_batch():
    # A runs 3: 3 + 1 = 4 fills bucket 4 exactly. B runs 2: 2 + 1 = 3 pads to 4 (1 row).
    # A's zero waste beats B's lighter load.
    cands = [("B", stats((1, 2, 4, 8), running=2)), ("A", stats((1, 2, 4, 8), running=3))]
    assert rank(hint(1), cands).tiers == [["A"], ["B"]]


def test_load_breaks_padding_ties():
    # Same waste: A holds 4 (+4 = bucket 8 exactly), B holds 8 running + 4 queued (+4 = bucket 16).
    ladder = (1, 2, 4, 8, 16)
    cands = [("B", stats(ladder, running=8, queued=4)), ("A", stats(ladder, running=4))]
    r = rank(hint(4), cands)
    assert r.tiers == [["A"], ["B"]]  # a rank each: Ray must not re-order them by request count


def test_sequence_load_beats_request_count():
    """Ray picks the shortest live queue (in requests) inside a rank. "chatty" holds 16 one-prompt
    requests, "batchy" three 60-prompt batches; with both in one rank Ray would send the next
    batch to "batchy" (3 requests < 16): the 284:124 burst split measured on 2x H200. The
    sequence load must put "chatty" in a rank of its own, ahead."""
    ladder = (1, 2, 4, 8, 16, 32, 64)
    cands = [("batchy", stats(ladder, running=64, queued=116, max_num_seqs=64, free_slots=0)),
             ("chatty", stats(ladder, running=16, max_num_seqs=64, free_slots=48))]
    r = rank(hint(50), cands)           # 16 + 50 > 64: fits nowhere now, still the lighter first
    assert r.tiers == [["chatty"], ["batchy"]] and r.outcome == NO_FIT
    r = rank(hint(8), cands)
    assert r.tiers == [["chatty"], ["batchy"]] and r.outcome == GRAPH_FIT


def test_equal_load_ties_are_broken_at_random_one_replica_per_rank():
    ladder = (1, 2, 4, 8, 16)
    cands = [("A", stats(ladder, running=4)), ("B", stats(ladder, running=4)), ("C", stats(ladder, running=5))]
    orders = {tuple(t[0] for t in rank(hint(4), cands, seed=seed).tiers) for seed in range(20)}
    assert orders == {("A", "B", "C"), ("B", "A", "C")}


def test_queued_sequences_count_toward_the_rows():
    # 6 running + 4 queued + 2 new = 12 > 8: the batch would decode past the largest bucket.
    r = rank(hint(2), [("A", stats((1, 2, 4, 8), running=6, queued=4, max_num_seqs=16, free_slots=10))])
    assert r.outcome == NO_FIT and r.estimates["A"].rows == 12 and not r.estimates["A"].graph
    r = rank(hint(2), [("A", stats((1, 2, 4, 8), running=6, max_num_seqs=16, free_slots=10))])
    assert r.outcome == GRAPH_FIT and r.estimates["A"].bucket == 8


def test_outstanding_sequences_bound_stale_stats_from_below():
    """A burst between two stats publishes: the router's own in-flight count keeps it from piling
    every request onto the replica whose (stale) stats say idle."""
    cands = [("small", stats((1, 2, 4, 8))), ("large", stats((16, 32, 64)))]
    assert rank(hint(1), cands).tiers[0] == ["small"]                      # idle: no padding there
    r = rank(hint(1), cands, outstanding={"small": Outstanding(8)})       # 8 already sent there
    assert r.tiers[0] == ["large"] and r.outcome == "graph_fit"
    assert rank(hint(1), cands, outstanding={"small": Outstanding(3)}).tiers[0] == ["small"]
    # sent after the stats were stamped: on top of what they show
    busy = [("small", stats((1, 2, 4, 8), running=5)), ("large", stats((16, 32, 64)))]
    assert rank(hint(1), busy, outstanding={"small": Outstanding(3)}).tiers[0] == ["small"]
    assert rank(hint(1), busy, outstanding={"small": Outstanding(3, 3)}).tiers[0] == ["large"]


@pytest.mark.parametrize("h, s, outcome", [
    (hint(2), stats((1, 2, 4, 8), running=2, free_slots=1), NO_FIT),           # slots held elsewhere
    (hint(2), stats((1, 2, 4, 8), max_num_seqs=3, free_slots=3, running=2), NO_FIT),  # row limit
    (hint(2), stats((1, 2, 4, 8), max_num_seqs=3, running=1), GRAPH_FIT),
    (hint(9), stats((1, 2, 4, 8), max_num_seqs=16), NO_FIT)])                  # eager-only batch
def test_free_slots_and_max_num_seqs_bound_a_fit(h, s, outcome):
    assert rank(h, [("A", s)]).outcome == outcome


def test_over_long_sequences_never_fit():
    cands = [("short_kv", stats((1, 2, 4, 8), max_seq_len=512)),
             ("full", stats((1, 2, 4, 8), running=8)),      # length ok, no slot: capacity wait
             ("unknown", None)]
    r = rank(hint(1, max_total_tokens=1000), cands)
    assert r.outcome == NO_FIT
    assert r.tiers == [["full"], ["unknown"], ["short_kv"]]  # too long goes last, still routable


@pytest.mark.parametrize("age_s", [STALE + 1, -(STALE + 1)])
def test_stale_or_missing_stats_rank_after_every_usable_replica(age_s):
    """Even a replica known to be full and backlogged ranks before one whose state is unknown."""
    cands = [("fit", stats()), ("stale", stats(timestamp=NOW - age_s)), ("none", None),
             ("full", stats(running=8, prefill_backlog_tokens=10**6))]
    r = rank(hint(2), cands)
    assert r.outcome == GRAPH_FIT
    assert r.tiers[:2] == [["fit"], ["full"]] and sorted(r.tiers[2] + r.tiers[3]) == ["none", "stale"]
    assert set(r.estimates) == {"fit", "full"}


def test_unknown_replicas_are_ordered_by_what_this_router_sent_them():
    cands = [("u1", None), ("u2", None), ("u3", None)]
    sent = {"u1": Outstanding(4, 4, 100), "u2": Outstanding(1, 1, 9000)}
    assert rank(hint(1), cands, outstanding=sent).tiers == [["u3"], ["u2"], ["u1"]]


def test_small_clock_skew_is_tolerated():
    r = rank(hint(2), [("ahead", stats(timestamp=NOW + 2.0))])
    assert r.outcome == GRAPH_FIT


def test_all_stats_missing_is_still_routable():
    r = rank(hint(2), [("a", None), ("b", None)])
    assert r.outcome == NO_STATS and sorted(r.tiers) == [["a"], ["b"]]


@pytest.mark.parametrize("bad", [
    stats(buckets=()), stats(buckets=(8, 4)), stats(buckets=(0, 4)), stats(running=-1),
    stats(max_seq_len=0), stats(timestamp=float("nan")), stats(running=None, free_slots=1),
    stats(queued=1.5),
    stats(timestamp="yesterday"),
    ReplicaStats.from_dict({"captured_buckets": "x"}), ReplicaStats.from_dict({"running": 1})])
def test_malformed_stats_rank_as_unknown_without_raising(bad):
    r = rank(hint(1), [("bad", bad), ("good", stats())])
    assert r.tiers == [["good"], ["bad"]]


def test_empty_candidates():
    assert rank(hint(1), []).tiers == []
    assert rank(None, []).tiers == []


# --- the estimate decides ------------------------------------------------------------------------

def test_an_idle_replica_beats_a_busy_exact_fit():
    """The padding-first policy sent this batch where it filled bucket 8 exactly, behind 3 s of
    queued prefill; the estimate sends it to the idle replica, padding one row."""
    h = job([tokens(i, 512) for i in range(3)], max_tokens=128)
    cands = [("busy", paged(LATENCY, running=5, prefill_backlog_tokens=120_000)),
             ("idle", paged(LATENCY))]
    r = rank(h, cands)
    assert r.tiers == [["idle"], ["busy"]] and r.outcome == GRAPH_FIT
    assert r.estimates["busy"].padding == 0 and r.estimates["idle"].padding == 1
    assert r.estimates["busy"].first_token_s > 3.0 > r.estimates["idle"].last_token_s


def test_a_prefix_cached_replica_wins_a_shared_prefix_batch_until_its_backlog_outweighs_it():
    shared = tokens(0, 1024)                      # 64 blocks every prompt starts with
    h = job([shared + tokens(i, 64) for i in range(1, 9)], max_tokens=64)
    holder = dict(prefix_hashes=cached(shared), running=4)
    r = rank(h, [("cold", paged()), ("holder", paged(**holder))])
    assert r.tiers[0] == ["holder"]
    assert r.estimates["holder"].prefill_tokens == 8 * 64
    assert r.estimates["cold"].prefill_tokens == 8 * 1088
    # 8 x 1024 cached tokens are worth 0.2 s at 40k tokens/s; a 1 s backlog is not
    r = rank(h, [("cold", paged()), ("holder", paged(prefill_backlog_tokens=40_000, **holder))])
    assert r.tiers[0] == ["cold"]


def test_prefixes_this_router_sent_recently_count_as_cached():
    shared = tokens(0, 1024)
    h = job([shared + tokens(1, 64)], max_tokens=64)
    cands = [("A", paged(LATENCY, running=1)), ("B", paged(LATENCY))]
    assert rank(h, cands).tiers[0] == ["B"]
    recent = {"A": {hash_ for _, hash_ in job([shared], 1).prefix_hashes[0]}}
    r = rank_replicas(h, cands, now=NOW, stale_after_s=STALE, rng=random.Random(0),
                      recent_prefixes=recent)
    assert r.tiers[0] == ["A"] and r.estimates["A"].prefill_tokens == 64


def test_graph_fit_breaks_a_near_tie_and_only_a_near_tie():
    """12 sequences: the latency tier would step eagerly, the throughput tier replays bucket 16
    behind some backlog. Within NEAR_TIE_REL of each other the graph wins; past it, the estimate."""
    h = job([tokens(i, 256) for i in range(12)], max_tokens=128)
    eager = ("eager", paged(LATENCY))
    near = rank(h, [eager, ("graph", paged(THROUGHPUT, prefill_backlog_tokens=20_000))])
    sc = scores(near, h)
    assert sc["eager"] < sc["graph"] <= sc["eager"] * (1 + NEAR_TIE_REL)
    assert near.tiers[0] == ["graph"] and near.outcome == GRAPH_FIT
    far = rank(h, [eager, ("graph", paged(THROUGHPUT, prefill_backlog_tokens=30_000))])
    assert far.tiers[0] == ["eager"] and far.outcome == NO_FIT


def test_a_chat_follow_up_goes_home_when_the_loads_are_a_near_tie():
    """Turn 2 of a chat (a shared system prefix both replicas hold + this conversation's history):
    the ~400 history tokens its home replica holds are ~10 ms of prefill, inside the near-tie band
    of a batch whose score is dominated by its decode; the tie goes to the home replica, even
    where its bucket pads more, as long as its first token is not later than the band (a busier
    home whose queue eats the saving loses the tie: the first token is what a chat user waits for)."""
    system, history = tokens(0, 640), tokens(5, 400)
    turn2 = system + history + tokens(6, 80)
    h = job([turn2], max_tokens=64)
    other = ("other", paged(LATENCY, running=2, prefix_hashes=cached(system)))

    def home(backlog):
        return ("home", paged(LATENCY, running=4, prefill_backlog_tokens=backlog,
                              prefix_hashes=cached(system, system + history)))   # busier: affinity piles up

    r = rank(h, [other, home(380)])
    sc = scores(r, h)
    assert sc["other"] < sc["home"] <= sc["other"] * (1 + NEAR_TIE_REL)      # a near tie, home behind
    assert r.estimates["home"].padding > r.estimates["other"].padding        # padding says "other"
    assert r.estimates["home"].prefill_tokens < r.estimates["other"].prefill_tokens
    assert r.tiers[0] == ["home"]
    r = rank(h, [other, home(600)])                                          # still a near tie, but
    sc = scores(r, h)
    assert sc["other"] < sc["home"] <= sc["other"] * (1 + NEAR_TIE_REL)
    first = {k: e.first_token_s for k, e in r.estimates.items()}
    assert first["home"] > first["other"] * (1 + NEAR_TIE_REL) + 0.001      # home's first token later
    assert r.tiers[0] == ["other"]
    assert rank(h, [other, home(1_200)]).tiers[0] == ["other"]               # past the band: the estimate


def test_padding_breaks_a_near_tie_unless_it_costs_the_first_token():
    """A: 3 running + 1 fills bucket 4; B: 2 + 1 pads a row. With 40 more tokens queued on A (1 ms
    of prefill) the two are a near tie and padding packs A. With 200 more (5 ms, 16% of B's first
    token) the scores are still a near tie, but A would pay for its fuller bucket with the first
    token: B. Far apart, the estimate decides."""
    h = job([tokens(1, 256)], max_tokens=128)
    b = ("B", paged(LATENCY, running=2, prefill_backlog_tokens=1_000))

    def first(a_backlog):
        r = rank(h, [b, ("A", paged(LATENCY, running=3, prefill_backlog_tokens=a_backlog))])
        sc = scores(r, h)
        return r.tiers[0][0], max(sc.values()) <= min(sc.values()) * (1 + NEAR_TIE_REL)

    assert first(1_040) == ("A", True)
    assert first(1_200) == ("B", True)
    assert first(8_000) == ("B", False)


def test_a_fresh_replica_uses_the_fleets_measured_rates():
    """A fast model (1.4 ms steps, 100k tokens/s): judged by the default 8B-like curve, a fresh
    idle replica would look slower than a measured one holding two sequences."""
    fast = {b: 0.0014 + 0.00001 * b for b in LADDER}
    h = job([tokens(1, 256)], max_tokens=256)
    measured = paged(running=2, decode_step_s=fast, prefill_tokens_per_s=100_000.0)
    fresh = paged(decode_step_s={}, prefill_tokens_per_s=0.0)
    r = rank(h, [("measured", measured), ("fresh", fresh)])
    assert r.tiers[0] == ["fresh"]
    assert r.estimates["fresh"].last_token_s == pytest.approx(256 / 100_000 + 255 * fast[1])


# --- tiers: a choice, not a trap ----------------------------------------------------------------

def tiers(**throughput_kw):
    return [("latency", paged(LATENCY)), ("throughput", paged(THROUGHPUT, **throughput_kw))]


def test_a_big_batch_takes_the_throughput_tier_while_its_queue_is_short():
    h = job([tokens(i, 512) for i in range(32)], max_tokens=256)
    for backlog in (0, 30_000):
        r = rank(h, tiers(prefill_backlog_tokens=backlog))
        assert r.tiers[0] == ["throughput"] and r.estimates["throughput"].bucket == 32


def test_a_big_batch_takes_the_latency_tier_eagerly_when_the_throughput_tier_is_slower_even_so():
    h = job([tokens(i, 512) for i in range(32)], max_tokens=256)
    r = rank(h, tiers(prefill_backlog_tokens=60_000))
    assert r.tiers[0] == ["latency"] and r.outcome == NO_FIT
    assert not r.estimates["latency"].graph            # it pays eager steps there, and still wins


def test_an_interactive_request_takes_the_latency_tier_unless_it_is_behind_there():
    h = job([tokens(1, 512)], max_tokens=128)
    assert rank(h, tiers()).tiers[0] == ["latency"]
    busy = [("latency", paged(LATENCY, running=4, prefill_backlog_tokens=8_000)),
            ("throughput", paged(THROUGHPUT))]
    assert rank(h, busy).tiers[0] == ["throughput"]


def test_a_full_latency_tier_with_a_short_queue_beats_a_prefill_backlog_until_its_rows_free_late():
    """A chat turn (60 output tokens) on tiers: the latency tier's 8 rows are all running with 2
    sequences queued, its sequences average 60 tokens, so a row frees every 7.5 steps and the turn
    waits ~22 steps (~0.15 s); the throughput tier has 0.25 s of prefill queued. The latency tier
    wins, unless its running rows all started together and none ends for 100 steps."""
    h = job([tokens(1, 256)], max_tokens=60)
    full = dict(running=8, queued=2, max_num_seqs=8, free_slots=0, mean_output_tokens=60.0)
    busy = paged(THROUGHPUT, running=40, prefill_backlog_tokens=10_000)
    assert rank(h, [("latency", paged(LATENCY, **full)), ("throughput", busy)]).tiers[0] == ["latency"]
    late = paged(LATENCY, **full, min_remaining_steps=100)
    assert rank(h, [("latency", late), ("throughput", busy)]).tiers[0] == ["throughput"]


# --- ranking without a hint ----------------------------------------------------------------------

def test_without_hint_rank_by_load_only():
    cands = [("busy", stats(running=6, queued=2)), ("unknown", None), ("idle", stats()),
             ("mid", stats((16, 32), running=3))]
    r = rank(None, cands)
    assert r.outcome == NO_HINT and r.tiers == [["idle"], ["mid"], ["busy"], ["unknown"]]


# --- replicas that share a GPU (num_gpus < 1) ------------------------------------------------------

def test_an_idle_replica_loses_to_one_alone_when_its_gpu_neighbour_is_busy():
    """Four replicas on two GPUs: "a" is idle but shares GPU 0 with "b" (200 rows decoding and a
    40k-token prefill queue); "c" and "d" share GPU 1 and are idle. Without device keys "a" and
    "c" look the same; with them, "a" pays its neighbour's queue and steps, and loses to "c" and "d"
    (and even to "b": a row in b's batch costs less than a step of its own between b's steps)."""
    h = job([tokens(1, 256)], max_tokens=128)
    busy = dict(running=200, decode_rows=200, prefill_backlog_tokens=40_000)
    blind = [("a", paged(LADDER)), ("b", paged(LADDER, **busy)), ("c", paged(LADDER)), ("d", paged(LADDER))]
    seen = [(k, paged(LADDER, device=dev, **(busy if k == "b" else {})))
            for k, dev in (("a", "n:0"), ("b", "n:0"), ("c", "n:1"), ("d", "n:1"))]
    sb, ss = scores(rank(h, blind), h), scores(rank(h, seen), h)
    assert sb["a"] == pytest.approx(sb["c"])                        # blind: a and c are equal
    r = rank(h, seen)
    assert [t[0] for t in r.tiers] in (["c", "d", "b", "a"], ["d", "c", "b", "a"])
    assert r.estimates["a"].first_token_s >= 40_000 / 40_000          # b's queue runs first on GPU 0
    assert ss["a"] > sb["a"] + 128 * STEPS[64] * 0.9                  # and b's steps interleave with a's
    assert ss["c"] == pytest.approx(sb["c"])                          # idle neighbours cost nothing


def test_a_replica_alone_on_its_gpu_is_estimated_as_before():
    """Distinct device keys (one replica per GPU, the default) change no estimate."""
    h = job([tokens(2, 512), tokens(3, 512)], max_tokens=64)
    plain = [("x", paged(LADDER, running=30, decode_rows=30, prefill_backlog_tokens=5_000)), ("y", paged(LADDER))]
    keyed = [(k, paged(LADDER, device=f"n:{i}", **({"running": 30, "decode_rows": 30,
                                                      "prefill_backlog_tokens": 5_000} if k == "x" else {})))
             for i, k in enumerate(("x", "y"))]
    assert scores(rank(h, plain), h) == pytest.approx(scores(rank(h, keyed), h))


def test_this_routers_sends_to_a_neighbour_count_before_its_stats_show_them():
    """A burst at t=0: every replica idle in its stats. What this router already sent to "b" (on
    GPU 0 with "a") makes "a" worse than the replicas of GPU 1, so the burst spreads over GPUs."""
    h = job([tokens(4, 512)] * 8, max_tokens=128)
    cands = [(k, paged(LADDER, device=dev)) for k, dev in (("a", "n:0"), ("b", "n:0"), ("c", "n:1"), ("d", "n:1"))]
    sent = {"b": Outstanding(sequences=64, recent_sequences=64, recent_prompt_tokens=64 * 512)}
    r = rank(h, cands, outstanding=sent)
    assert {r.tiers[0][0], r.tiers[1][0]} == {"c", "d"} and {r.tiers[2][0], r.tiers[3][0]} == {"a", "b"}
    assert r.estimates["a"].first_token_s > r.estimates["c"].first_token_s + 0.5   # b's 32k queued tokens
    blind = rank(h, [(k, paged(LADDER)) for k, _ in cands], outstanding=sent)
    assert blind.tiers[-1] == ["b"]                               # blind, "a" is as good as c and d
    assert blind.estimates["a"].first_token_s == blind.estimates["c"].first_token_s
