"""BucketAwareRequestRouter (router/request_router.py) against fake replicas, without Ray running.

The router is a real instance: Ray's constructor needs only a deployment id and a handle source
(see `router_fakes.make_router`), so `choose_replicas` is exercised as Ray calls it, and one test
drives Ray's own routing loop (`_choose_replica_for_request`, the entry Ray's `Router` uses).
"""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import ray
from router_fakes import (  # noqa: F401 (current_loop, no_ray_init: fixtures)
    BLOCK, FakeClock, FakeRunningReplica, cached, current_loop, hint, job, make_router, names,
    no_ray_init, pending, replica, stats, tokens)

import router.request_router as rr
from router.policy import GRAPH_FIT, NO_HINT, NO_STATS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _loop(current_loop):
    yield current_loop


def run(coro):
    return asyncio.get_event_loop().run_until_complete(coro)


def choose(router, candidates, pr):
    return run(router.choose_replicas(candidates, pr))


def ab_replicas():
    return [replica("A", stats((1, 2, 4, 8))), replica("B", stats((16, 32, 64)))]


@pytest.mark.parametrize("n, first", [(5, "A"), (20, "B")])
@pytest.mark.parametrize("as_dict", [False, True])
def test_hint_routes_to_least_padding(n, first, as_dict):
    outcomes = []
    router = make_router(outcomes=outcomes)
    h = hint(n)
    raw = {"num_sequences": n, "max_total_tokens": h.max_total_tokens} if as_dict else h
    tiers = choose(router, ab_replicas(), pending(raw))
    assert names(tiers)[0] == [first]
    assert all(isinstance(r, FakeRunningReplica) for t in tiers for r in t)
    assert outcomes == [GRAPH_FIT]


def test_pending_request_none_ranks_by_load_and_counts_nothing():
    outcomes = []
    router = make_router(outcomes=outcomes)
    cands = [replica("busy", stats(running=6)), replica("idle", stats())]
    assert names(choose(router, cands, None)) == [["idle"], ["busy"]]
    assert outcomes == []


def test_request_without_hint():
    outcomes = []
    router = make_router(outcomes=outcomes)
    tiers = choose(router, ab_replicas(), pending(None, max_tokens=4))
    assert sorted(names(tiers)) == [["A"], ["B"]] and outcomes == [NO_HINT]


def test_stale_stats_become_unknown_but_stay_routable():
    clock, outcomes = FakeClock(), []
    router = make_router(clock=clock, outcomes=outcomes, stale_after_s=5.0)
    cands = ab_replicas()
    assert names(choose(router, cands, pending(hint(5))))[0] == ["A"]
    clock.advance(6.0)  # nothing published since: both replicas' stats are now stale
    tiers = choose(router, cands, pending(hint(5)))
    assert sorted(names(tiers)) == [["A"], ["B"]]
    assert outcomes == [GRAPH_FIT, NO_STATS]


class _Exploding:
    """A routing_stats value whose every access raises."""

    def __getitem__(self, key):
        raise RuntimeError("boom")

    def __bool__(self):
        raise RuntimeError("boom")


@pytest.mark.parametrize("bad", [None, [], "garbage", {"captured_buckets": "x"},
                                 {"captured_buckets": [8, 4], "max_seq_len": 1}, _Exploding()])
def test_malformed_stats_do_not_raise(bad):
    router = make_router()
    tiers = choose(router, [FakeRunningReplica("bad", bad), replica("good", stats())],
                   pending(hint(2)))
    assert names(tiers) == [["good"], ["bad"]]


def test_policy_exception_does_not_escape(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(rr, "rank_replicas", broken)
    router = make_router()
    cands = [replica(f"r{i}", stats()) for i in range(4)]
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        tiers = choose(router, cands, pending(hint(1)))
        choose(router, cands, pending(hint(1)))  # second failure within a minute: not logged again
    assert len(tiers) == 1 and sorted(names(tiers)[0]) == ["r0", "r1", "r2", "r3"]
    assert [r.message for r in caplog.records].count(
        "graphserve router: ranking failed; routing to any replica") == 1


def test_uninitialized_router_still_routes():
    router = make_router()
    del router._rng  # as if initialize_state never ran
    tiers = choose(router, ab_replicas(), pending(hint(1)))
    assert sorted(names(tiers)[0]) == ["A", "B"]


def test_fallback_shuffles_candidates(monkeypatch):
    monkeypatch.setattr(rr, "rank_replicas", lambda *a, **k: 1 / 0)
    router = make_router()
    cands = [replica(f"r{i}", stats()) for i in range(3)]
    firsts = Counter(names(choose(router, cands, pending(hint(1))))[0][0] for _ in range(300))
    assert set(firsts) == {"r0", "r1", "r2"}


def test_metric_failure_never_breaks_routing():
    router = make_router()
    router._record_outcome = lambda outcome: 1 / 0
    assert names(choose(router, ab_replicas(), pending(hint(5))))[0] == ["A"]


def test_default_metric_path_is_safe_without_ray(monkeypatch):
    monkeypatch.setattr(rr, "_decisions_counter", None)
    monkeypatch.setattr(rr, "_metric_failed", False)
    rr._record_outcome(GRAPH_FIT)  # creates the Ray counter lazily; must neither raise nor init Ray
    rr._record_outcome(GRAPH_FIT)
    assert not ray.is_initialized()


def test_outcome_counted_once_per_request_not_per_retry():
    outcomes = []
    router = make_router(outcomes=outcomes)
    pr = pending(hint(5))
    for _ in range(5):  # Ray calls choose_replicas again on every backoff round
        choose(router, ab_replicas(), pr)
    choose(router, ab_replicas(), pending(hint(20)))
    assert outcomes == [GRAPH_FIT, GRAPH_FIT]


def test_equal_replicas_are_not_always_the_first():
    router = make_router(seed=3)
    cands = [replica(name, stats()) for name in ("a", "b", "c")]
    firsts = Counter(names(choose(router, cands, pending(hint(1))))[0][0] for _ in range(900))
    assert all(200 < firsts[n] < 400 for n in "abc"), firsts


def test_bad_kwargs_are_logged_not_raised(caplog):
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        router = make_router(stale_after_s=-1, bogus=1)
    assert router._stale_after_s == rr.DEFAULT_STALE_AFTER_S
    assert "bogus" in caplog.text and "stale_after_s=-1" in caplog.text
    assert names(choose(router, ab_replicas(), pending(hint(5))))[0] == ["A"]


def test_ray_routing_loop_gives_each_request_its_own_choice():
    """Through Ray's loop: the replica chosen for a request goes to that request even when the
    probes finish out of order (with FIFOMixin, the oldest request would take it)."""
    async def main():
        router = make_router()
        a = replica("A", stats((1, 2, 4, 8)), probe_delay_s=0.05)  # slow probe: finishes last
        b = replica("B", stats((16, 32, 64)))
        router.update_replicas([a, b])
        small, big = pending(hint(5)), pending(hint(20))
        got = await asyncio.wait_for(asyncio.gather(router._choose_replica_for_request(small),
                                                    router._choose_replica_for_request(big)), 5)
        for _ in range(100):  # routing tasks exit once every request is fulfilled
            if router.curr_num_routing_tasks == 0:
                break
            await asyncio.sleep(0.01)
        assert router.curr_num_routing_tasks == 0 and router.num_pending_requests == 0
        return names([got])[0]

    assert run(main()) == ["A", "B"]


def _fresh_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_router_never_imports_torch_and_policy_never_imports_ray():
    out = _fresh_python("""
        import sys
        import router.policy, router.buckets, router.stats, router.metrics
        no_ray = 'ray' not in sys.modules
        import router.request_router
        print(no_ray, 'torch' in sys.modules)
    """)
    assert out == "True False"


def test_request_router_config_pickles_by_value_and_routes(tmp_path):
    """Ray cloudpickles the class by value from its import path (`RequestRouterConfig`); a fresh
    process (as a caller is) must load it, route with it, and still not import torch."""
    blob = tmp_path / "router.pkl"
    _fresh_python(f"""
        from ray.serve.config import RequestRouterConfig
        config = RequestRouterConfig(
            request_router_class="router.request_router:BucketAwareRequestRouter",
            request_router_kwargs={{"stale_after_s": 3.0}})
        open({str(blob)!r}, "wb").write(config.get_serialized_request_router_cls())
    """)
    out = _fresh_python(f"""
        import asyncio, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from ray.serve._private.common import DeploymentHandleSource
        from ray.serve.config import RequestRouterConfig
        from router_fakes import DEPLOYMENT, hint, names, pending, replica, stats
        cls = RequestRouterConfig.from_serialized_request_router_cls(
            {{"request_router_class": "router.request_router:BucketAwareRequestRouter"}},
            open({str(blob)!r}, "rb").read()).get_request_router_class()
        r = cls(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
        r.initialize_state(stale_after_s=3.0, seed=0, record_outcome=lambda outcome: None)
        now = time.time()
        cands = [replica("A", stats((1, 2, 4, 8), timestamp=now)),
                 replica("B", stats((16, 32), timestamp=now))]

        async def go():
            return await r.choose_replicas(cands, pending(hint(20)))

        print(names(asyncio.run(go()))[0], 'torch' in sys.modules, cls.__module__)
    """)
    assert out == "['B'] False router.request_router"


def test_burst_between_stats_publishes_spreads_by_what_the_router_sent():
    """Stats say both replicas are idle for the whole burst; the router's own in-flight count
    stops it from sending more than 8 single requests to the [1, 2, 4, 8] replica, and frees the
    room again once those requests complete."""
    router = make_router()
    replicas = ab_replicas()
    chosen = []
    for i in range(12):
        pr = pending(hint(1), request_id=f"r{i}")
        first = choose(router, replicas, pr)[0][0]
        router.on_request_routed(pr, first.replica_id, None)
        chosen.append(first)
    names_chosen = [r.replica_id.unique_id for r in chosen]
    assert names_chosen[:8] == ["A"] * 8 and names_chosen[8:] == ["B"] * 4
    for i in range(8):
        router.on_request_completed(chosen[i].replica_id, f"r{i}")
    assert choose(router, replicas, pending(hint(1), request_id="late"))[0][0].replica_id.unique_id == "A"


def test_burst_ranked_before_any_acceptance_still_spreads():
    """Ray calls on_request_routed only after the replica accepted (one RPC later), so a burst is
    ranked with nothing confirmed; reservations made at ranking time must still spread it. Eight
    16-prompt batches over two idle [1..64] replicas through Ray's own routing loop: 64 and 64
    sequences (without reservations every batch saw two idle replicas and picked by coin toss)."""
    ladder = (1, 2, 4, 8, 16, 32, 64)

    async def main():
        router = make_router()
        router.update_replicas([replica("A", stats(ladder)), replica("B", stats(ladder))])
        got = await asyncio.wait_for(asyncio.gather(
            *[router._choose_replica_for_request(pending(hint(16))) for _ in range(8)]), 5)
        return Counter(r.replica_id.unique_id for r in got)

    assert run(main()) == {"A": 4, "B": 4}


def test_a_rerank_does_not_count_its_own_reservation():
    router = make_router()
    replicas = [replica("A", stats((1, 2, 4, 8, 16))), replica("B", stats((1, 2, 4, 8, 16)))]
    pr = pending(hint(8), request_id="retry-me")
    firsts = {names(choose(router, replicas, pr))[0][0] for _ in range(20)}
    assert len(firsts) == 2, "re-ranking the same request must not see its own reservation as load"


# --- the estimate through Ray's loop -------------------------------------------------------------

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
    that replica publishes stats stamped after the completion without the prefix (evicted), the
    router stops assuming it."""
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
    first.routing_stats = paged(timestamp=clock.t + 0.1).to_dict()
    firsts = {names(choose(router, replicas, pending(job([turn2], 100))))[0][0] for _ in range(30)}
    assert firsts == {"A", "B"}, (holder, firsts)


def test_reservations_hold_the_estimated_work_and_a_move_takes_the_whole_prompt():
    router = make_router()
    replicas = [replica("A", paged(prefix_hashes=cached(SHARED))), replica("B", paged())]
    pr = pending(job([SHARED + tokens(5, 64)], max_tokens=8), request_id="r")
    assert names(choose(router, replicas, pr))[0] == ["A"]
    since = {r.replica_id: 0.0 for r in replicas}
    assert router._inflight.outstanding(router._clock(), since)[replicas[0].replica_id] == (1, 1, 64, 0)
    router.on_request_routed(pr, replicas[1].replica_id, None)    # A was full: Ray took B
    moved = router._inflight.outstanding(router._clock(), since)
    assert moved == {replicas[1].replica_id: (1, 1, 1088, 0)}


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
