"""BucketAwareRequestRouter (router/request_router.py) against fake replicas, without Ray running.

The router is a real instance: Ray's constructor needs only a deployment id and a handle source
(see `router_fakes.make_router`), so `choose_replicas` is exercised as Ray calls it, and one test
drives Ray's own routing loop (`_choose_replica_for_request`, the entry Ray's `Router` uses).
The time estimate's decisions through that loop (bursts, prefixes, reservations):
test_router_estimate_in_ray_loop.py.
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
    FakeClock, FakeRunningReplica, choose, current_loop, hint, make_router, names, no_ray_init,
    pending, replica, run, stats)

import router.request_router as rr
from router.policy import GRAPH_FIT, NO_HINT, NO_STATS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _loop(current_loop):
    yield current_loop


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


@pytest.mark.parametrize("bad", [[], "garbage", {"captured_buckets": "x"},
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
        router = make_router(stale_after_s=-1, bogus=1, new_replica_idle_s=float("nan"))
    assert router._stale_after_s == rr.DEFAULT_STALE_AFTER_S
    assert router._new_replica_idle_s == rr.DEFAULT_NEW_REPLICA_IDLE_S
    assert "bogus" in caplog.text and "stale_after_s=-1" in caplog.text
    assert "new_replica_idle_s=nan" in caplog.text
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
