"""A replica that has not published stats yet (Ray hands over `{}` until its first poll): the router
ranks it as an idle copy of its freshest peer for `new_replica_idle_s` after Ray first offered it,
charging it what this router sent there, and as unknown after that (router/request_router.py
`_new_replicas_as_idle`). Real router instances, fake replicas, no Ray running."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from router_fakes import (  # noqa: F401 (current_loop, no_ray_init: fixtures)
    FakeClock, choose, current_loop, hint, make_router, names, no_ray_init, pending, replica, run,
    stats)

from router.policy import GRAPH_FIT, NO_STATS
from router.stats import ReplicaStats

LADDER = (1, 2, 4, 8, 16, 32, 64)


@pytest.fixture(autouse=True)
def _loop(current_loop):
    yield current_loop


def offer(router, replicas):
    """Ray's `update_replicas` call, made as Ray makes it: inside the router's event loop."""
    async def go():
        router.update_replicas(replicas)
        await asyncio.sleep(0.01)   # let Ray's queue-length probe of the new replicas finish
    run(go())


def busy_and_new():
    """A: 40 of 64 rows decoding, 2k prompt tokens queued; B: just started, nothing published."""
    return [replica("A", stats(LADDER, running=40, decode_rows=40, prefill_backlog_tokens=2048,
                               block_size=16, total_blocks=4096, free_blocks=1000,
                               prefill_tokens_per_s=20_000.0, decode_step_s={64: 0.02})),
            replica("B")]


def test_a_new_replica_takes_work_from_a_busy_one():
    outcomes = []
    router = make_router(outcomes=outcomes)
    tiers = choose(router, busy_and_new(), pending(hint(8, prompt_tokens=800, max_new_tokens=800)))
    assert names(tiers) == [["B"], ["A"]]
    assert outcomes == [GRAPH_FIT]


def test_idle_like_keeps_the_shape_and_drops_the_load():
    a = ReplicaStats.from_dict(busy_and_new()[0].routing_stats)
    b = a.idle_like(123.0)
    assert (b.captured_buckets, b.max_seq_len, b.max_num_seqs, b.block_size, b.total_blocks) == \
        (a.captured_buckets, a.max_seq_len, a.max_num_seqs, a.block_size, a.total_blocks)
    assert (b.running, b.queued, b.decode_rows, b.prefill_backlog_tokens) == (0, 0, 0, 0)
    assert (b.free_slots, b.free_blocks, b.timestamp) == (a.max_num_seqs, a.total_blocks, 123.0)
    assert b.prefill_tokens_per_s == 0.0 and b.decode_step_s == {} and b.prefix_hashes == ()


def test_a_burst_does_not_pile_onto_the_new_replica():
    """Both replicas idle, B never published: 16 eight-sequence batches ranked back to back (none
    accepted yet, as in a burst) split 8:8, because what the router sent B counts in full."""
    async def main():
        router = make_router()
        router.update_replicas([replica("A", stats(LADDER)), replica("B")])
        got = await asyncio.wait_for(asyncio.gather(
            *[router._choose_replica_for_request(pending(hint(8))) for _ in range(16)]), 5)
        return Counter(r.replica_id.unique_id for r in got)

    assert run(main()) == {"A": 8, "B": 8}


def test_a_replica_that_never_publishes_ranks_unknown_after_the_window():
    clock = FakeClock()
    router = make_router(clock=clock, new_replica_idle_s=5.0)
    cands = busy_and_new()
    offer(router, cands)                   # Ray offers both now
    assert names(choose(router, cands, pending(hint(8))))[0] == ["B"]
    clock.advance(6.0)
    cands[0].routing_stats = {**cands[0].routing_stats, "timestamp": clock()}   # A publishes again
    assert names(choose(router, cands, pending(hint(8)))) == [["A"], ["B"]]


def test_the_window_starts_when_ray_offers_the_replica_not_at_its_first_ranking():
    clock = FakeClock()
    router = make_router(clock=clock, new_replica_idle_s=5.0)
    cands = busy_and_new()
    offer(router, cands)
    clock.advance(6.0)
    cands[0].routing_stats = {**cands[0].routing_stats, "timestamp": clock()}
    assert names(choose(router, cands, pending(hint(8)))) == [["A"], ["B"]]


def test_zero_window_ranks_new_replicas_unknown():
    router = make_router(new_replica_idle_s=0)
    assert names(choose(router, busy_and_new(), pending(hint(8)))) == [["A"], ["B"]]


def test_without_a_usable_peer_nothing_is_assumed():
    outcomes = []
    router = make_router(outcomes=outcomes)
    tiers = choose(router, [replica("B"), replica("C")], pending(hint(8)))
    assert sorted(names(tiers)) == [["B"], ["C"]] and outcomes == [NO_STATS]


def test_a_malformed_publish_is_not_a_new_replica():
    router = make_router()
    cands = [busy_and_new()[0], replica("B")]
    cands[1].routing_stats = {"captured_buckets": "x"}
    assert names(choose(router, cands, pending(hint(8)))) == [["A"], ["B"]]
