"""The time estimate's decisions through Ray's own routing loop (router/request_router.py with
router/estimate.py), against fake replicas, without Ray running: bursts spread by work and
prompt tokens, prefix holders keep shared-prefix work until the estimate says otherwise, a second
turn follows the first before the replica publishes its prefix, reservations, stats parsing.
The router's adapter contract (never raising, stale stats, metrics): test_router_request_router.py.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest
from router_fakes import (  # noqa: F401 (current_loop, no_ray_init: fixtures)
    BLOCK, FakeClock, cached, choose, current_loop, hint, job, make_router, names, no_ray_init,
    pending, replica, run, stats, tokens)

import router.request_router as rr


@pytest.fixture(autouse=True)
def _loop(current_loop):
    yield current_loop


LADDER = (1, 2, 4, 8, 16, 32, 64)
STEPS = {1: 0.0063, 2: 0.0063, 4: 0.0064, 8: 0.0065, 16: 0.0068, 32: 0.0072, 64: 0.0082}
SHARED = tokens(0, 1024)   # a 64-block prefix


def paged(**kw):
    """A version-2 [1..64] replica: measured steps, 40k prompt tokens/s, 256 rows of paged KV."""
    base = dict(decode_step_s=STEPS, prefill_tokens_per_s=40_000.0, max_num_seqs=256, free_slots=256,
                block_size=BLOCK, total_blocks=20_000, free_blocks=20_000, max_seq_len=8192)
    return stats(LADDER, **{**base, **kw})


def route_burst(replicas, hints):
    """Every request through Ray's own routing loop at once (all ranked before any acceptance);
    the chosen replica names, in request order."""
    async def main():
        router = make_router()
        router.update_replicas(replicas)
        got = await asyncio.wait_for(asyncio.gather(
            *[router._choose_replica_for_request(pending(h)) for h in hints]), 5)
        return [r.replica_id.unique_id for r in got]

    return run(main())


@pytest.mark.parametrize("batch_at", [0, 10])
def test_a_burst_spreads_by_work_not_by_request_count(batch_at):
    """One 60-prompt batch job among 60 one-prompt requests, 500 prompt tokens each, two idle
    replicas: sequences and prompt tokens split about evenly, requests very unevenly (a router
    counting requests would split those evenly and put ~90 sequences on the batch's replica)."""
    hints = [job([tokens(i, 500)], max_tokens=128) for i in range(60)]
    hints.insert(batch_at, job([tokens(100 + i, 500) for i in range(60)], max_tokens=128))
    chosen = route_burst([replica("A", paged()), replica("B", paged())], hints)
    seqs, toks, reqs = Counter(), Counter(), Counter()
    for h, name in zip(hints, chosen):
        seqs[name] += h.num_sequences
        toks[name] += h.prompt_tokens
        reqs[name] += 1
    assert all(48 <= seqs[n] <= 72 for n in "AB"), seqs                  # of 120
    assert all(24_000 <= toks[n] <= 36_000 for n in "AB"), toks          # of 60,000
    assert max(reqs.values()) >= 3 * min(reqs.values()), reqs


def test_a_burst_of_one_prompt_requests_spreads_prompt_tokens():
    """Long (4000-token) and short (100-token) prompts alternate, short outputs: equal sequence
    counts per replica would not balance prefill; reserving each request's prompt tokens does."""
    hints = [job([tokens(i, 4000 if i % 2 else 100)], max_tokens=16) for i in range(20)]
    chosen = route_burst([replica("A", paged()), replica("B", paged())], hints)
    toks = Counter()
    for h, name in zip(hints, chosen):
        toks[name] += h.prompt_tokens
    assert all(abs(toks[n] - 20_500) <= 4_000 for n in "AB"), toks


@pytest.mark.parametrize("keyed", [True, False])
def test_a_burst_over_two_replicas_per_gpu_fills_one_replica_on_each_gpu(keyed):
    """Four idle replicas, two per GPU (the 4-replica run on 2x H200), a mix-like burst: batch jobs
    of 8-64 prompts among one-prompt requests. With device keys a row in the GPU's running batch
    costs less than a step of its own between that batch's steps, so each GPU's work goes to one
    of its replicas and the GPUs split it about evenly; without keys all four replicas get work."""
    hints = [job([tokens(100 * j + i, 400) for i in range(n)], max_tokens=128)
             for j, n in enumerate([8, 64, 16, 32, 48, 8, 24, 64])]
    hints += [job([tokens(10_000 + i, 300)], max_tokens=128) for i in range(40)]
    gpu = {"A": "n:0", "B": "n:0", "C": "n:1", "D": "n:1"}
    chosen = route_burst([replica(k, paged(device=dev if keyed else "")) for k, dev in gpu.items()], hints)
    per_replica, per_gpu = Counter(), Counter()
    for h, name in zip(hints, chosen):
        per_replica[name] += h.num_sequences
        per_gpu[gpu[name]] += h.num_sequences
    total = sum(per_gpu.values())                                   # 304 sequences
    assert all(0.4 * total <= per_gpu[d] <= 0.6 * total for d in ("n:0", "n:1")), per_gpu
    if keyed:
        assert sorted(gpu[n] for n in per_replica) == ["n:0", "n:1"], per_replica
    else:
        assert len(per_replica) == 4, per_replica


def test_a_prefix_heavy_burst_sticks_to_the_prefix_holder_until_the_estimate_says_otherwise():
    """Forty requests sharing a 1024-token prefix that only A holds: the first ones all go to A,
    each adding a little prefill and a row there, until A's growing load outweighs the 1024 tokens
    B would prefill; after B got one (so it holds the prefix too, as far as the router knows),
    both share the rest. With nothing cached anywhere, the first request makes its replica the
    holder (as far as the router knows), so near ties follow it in runs, and the load spreads as
    the runs tip the estimate: both replicas get work early, and neither more than 65%."""
    hints = [job([SHARED + tokens(i, 64)], max_tokens=64) for i in range(1, 41)]
    chosen = "".join(route_burst([replica("A", paged(prefix_hashes=cached(SHARED))),
                                  replica("B", paged())], hints))
    assert chosen.startswith("AAAA") and chosen.count("A") > chosen.count("B") >= 8, chosen
    cold = "".join(route_burst([replica("A", paged()), replica("B", paged())], hints))
    assert set(cold[:10]) == {"A", "B"}, cold                          # no prefix: both start early
    assert 14 <= cold.count("A") <= 26, cold
    # A's published backlog is past the benefit: nothing sticks
    behind = "".join(route_burst([replica("A", paged(prefix_hashes=cached(SHARED),
                                                     prefill_backlog_tokens=200_000)),
                                  replica("B", paged())], hints))
    assert behind == "B" * 40, behind


def test_a_second_turn_follows_the_first_before_the_replica_publishes_its_prefix():
    """Turn 1 went to one of two equal replicas and completed; neither has published since. Turn 2
    (turn 1's prompt + answer + a new message) goes where turn 1's blocks are, every time; once
    that replica publishes a prefix summary built after the completion without the prefix
    (evicted), the router stops assuming it."""
    clock = FakeClock()
    router = make_router(clock=clock)
    replicas = [replica("A", paged()), replica("B", paged())]
    for i in range(10):   # ten conversations
        turn1 = tokens(10 * i + 1, 2000)
        turn2 = turn1 + tokens(10 * i + 2, 300)
        pr1 = pending(job([turn1], max_tokens=100), request_id=f"t1-{i}")
        first = choose(router, replicas, pr1)[0][0]
        router.on_request_routed(pr1, first.replica_id, None)
        clock.advance(0.5)
        router.on_request_completed(first.replica_id, f"t1-{i}")
        pr2 = pending(job([turn2], max_tokens=100), request_id=f"t2-{i}")
        assert choose(router, replicas, pr2)[0][0] is first
        router.on_request_completed(first.replica_id, f"t2-{i}")   # never accepted: forgotten
    holder = first.replica_id.unique_id
    first.routing_stats = paged(timestamp=clock.t + 0.1, prefix_summary_time=clock.t + 0.1).to_dict()
    firsts = {names(choose(router, replicas, pending(job([turn2], 100))))[0][0] for _ in range(30)}
    assert firsts == {"A", "B"}, (holder, firsts)


def test_the_router_keeps_a_turns_prefix_until_the_replica_summarises_after_it():
    """The replica's stats are newer than its prefix summary (rebuilt less often): stats stamped
    long after turn 1 completed, with a summary built before that, do not make the router forget
    where turn 1's blocks are; a summary built after the completion without them (evicted) does."""
    clock = FakeClock()
    router = make_router(clock=clock)
    replicas = [replica("A", paged()), replica("B", paged())]
    turn1 = tokens(1, 2000)
    turn2 = turn1 + tokens(2, 300)
    pr1 = pending(job([turn1], max_tokens=100), request_id="t1")
    first = choose(router, replicas, pr1)[0][0]
    router.on_request_routed(pr1, first.replica_id, None)
    clock.advance(0.5)
    router.on_request_completed(first.replica_id, "t1")
    done = clock.t
    for r in replicas:   # both publish much later; neither summary has been rebuilt since turn 1
        r.routing_stats = paged(timestamp=done + 5.0, prefix_summary_time=done - 0.2).to_dict()
    clock.advance(5.0)
    picks = {names(choose(router, replicas, pending(job([turn2], 100))))[0][0] for _ in range(20)}
    assert picks == {first.replica_id.unique_id}
    first.routing_stats = paged(timestamp=done + 5.5, prefix_summary_time=done + 0.1).to_dict()
    picks = {names(choose(router, replicas, pending(job([turn2], 100))))[0][0] for _ in range(30)}
    assert picks == {"A", "B"}


def test_a_summary_is_never_taken_as_newer_than_its_stats_and_defaults_to_a_lag():
    assert rr._summary_time(paged(timestamp=100.0, prefix_summary_time=99.5)) == 99.5
    assert rr._summary_time(paged(timestamp=100.0, prefix_summary_time=101.0)) == 100.0
    assert rr._summary_time(paged(timestamp=100.0)) == 100.0 - rr.PREFIX_SUMMARY_LAG_S   # an older peer


def test_reservations_hold_the_estimated_work_and_a_move_takes_the_whole_prompt():
    router = make_router()
    replicas = [replica("A", paged(prefix_hashes=cached(SHARED))), replica("B", paged())]
    pr = pending(job([SHARED + tokens(5, 64)], max_tokens=8), request_id="r")
    assert names(choose(router, replicas, pr))[0] == ["A"]
    since = {r.replica_id: 0.0 for r in replicas}
    assert router._inflight.outstanding(router._clock(), since)[replicas[0].replica_id][:4] == (1, 1, 64, 0)
    router.on_request_routed(pr, replicas[1].replica_id, None)    # A was full: Ray took B
    moved = router._inflight.outstanding(router._clock(), since)
    assert {r: o[:4] for r, o in moved.items()} == {replicas[1].replica_id: (1, 1, 1088, 0)}


def test_stats_are_parsed_once_per_published_dict(monkeypatch):
    calls = []
    real = rr.ReplicaStats.from_dict
    monkeypatch.setattr(rr.ReplicaStats, "from_dict",
                        classmethod(lambda cls, d: calls.append(1) or real(d)))
    router = make_router()
    replicas = [replica("A", paged(prefix_hashes=cached(SHARED))), replica("B", paged())]
    for _ in range(5):
        choose(router, replicas, pending(job([SHARED], max_tokens=4)))
    assert len(calls) == 2
    replicas[0].routing_stats = paged().to_dict()                  # a new publish
    choose(router, replicas, pending(job([SHARED], max_tokens=4)))
    assert len(calls) == 3


@pytest.mark.parametrize("total", [1000, 10**400])   # estimated; too long for every replica
def test_absurd_hint_values_are_ranked_not_fallen_back(caplog, total):
    router = make_router()
    h = hint(3, total, prompt_tokens=10**400, max_new_tokens=10**400,
             prefix_hashes=(((1, 10**400),),), samples_per_prompt=10**400)
    replicas = [replica("A", paged(prefix_hashes=(10**400 % 2**63,))), replica("B", paged())]
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        for i in range(3):
            pr = pending(h, request_id=f"huge-{i}")
            tiers = choose(router, replicas, pr)
            router.on_request_routed(pr, tiers[0][0].replica_id, None)
    assert len(tiers) == 2 and "ranking failed" not in caplog.text


def test_a_batch_the_router_saw_finish_no_longer_weighs_on_a_stale_snapshot():
    """Back to back, version-1 stats as the replicas publish them today: the large tier's snapshot
    still shows the 64-sequence batch that completed after it. Counting those 64 rows, a batch of
    9 would rather wait on the small tier; the router knows they are gone."""
    clock = FakeClock()
    router = make_router(clock=clock)
    small = replica("small", stats((1, 2, 4, 8)))
    large = replica("large", stats((16, 32, 64)))
    first = pending(hint(64), request_id="big")
    assert names(choose(router, [small, large], first))[0] == ["large"]
    router.on_request_routed(first, large.replica_id, None)
    clock.advance(0.2)
    large.routing_stats = stats((16, 32, 64), running=64, timestamp=clock.t).to_dict()
    clock.advance(0.3)
    router.on_request_completed(large.replica_id, "big")
    for size in range(9, 65):   # each runs to completion before the next, as in the tier test
        pr = pending(hint(size), request_id=f"b{size}")
        assert names(choose(router, [small, large], pr))[0] == ["large"], size
        router.on_request_routed(pr, large.replica_id, None)
        router.on_request_completed(large.replica_id, f"b{size}")


@pytest.mark.parametrize("peers, then", [(1, "A"), (2, "B")])
def test_one_of_several_routers_counts_its_recent_sends_for_the_others(peers, then):
    """A publishes 1,500 fewer queued prompt tokens than B. After one 1,000-token prompt goes to A,
    a lone router still sees A ahead (1,000 vs 1,500 queued); one of two routers (`peers=2`, one
    per ingress) assumes the other sent as much there since the stats (2,000), and picks B."""
    replicas = [replica("A", paged(prefill_backlog_tokens=0)), replica("B", paged(prefill_backlog_tokens=1500))]

    async def main():
        router = make_router(peers=peers)
        router.update_replicas(replicas)
        got = []
        for i in range(2):
            r = await router._choose_replica_for_request(pending(job([tokens(i, 1000)], max_tokens=16)))
            got.append(r.replica_id.unique_id)
        return got

    assert run(main()) == ["A", then]
