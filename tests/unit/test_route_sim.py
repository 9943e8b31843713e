"""benchmarks/route_sim.py and sim_engine.py: the simulated fleet conserves work, and our real router, driven on the
simulation's clock, keeps chat turns where their history is cached (the model is what the
simulator's numbers rest on, so its bookkeeping is tested like the engine's)."""
from __future__ import annotations

import argparse

import pytest
from router_fakes import no_ray_init  # noqa: F401 (autouse fixture)

from benchmarks import route_sim as rs
from benchmarks import serve_traces as st
from benchmarks.sim_engine import LADDER, Seq, SimReplica

ARGS = argparse.Namespace(router_seed=0, stats_period_s=1.0, max_ongoing=32, block_size=16, horizon_s=300.0)


@pytest.mark.parametrize("router", ["default", "ours"])
@pytest.mark.parametrize("layout, trace", [("tiers", "mix"), ("ladder", "chat-long")])
def test_every_sequence_finishes_with_its_tokens(router, layout, trace):
    jobs = st.burst(st.TRACES["cpu"][trace], 0)
    out = rs.run_phase(layout, 2, router, jobs, ARGS)
    assert out["done"] == 1.0 and len(out["records"]) == sum(j.sequences for j in jobs)
    assert all(r["ttft"] >= 0 and r["tpot"] >= 0 for r in out["records"])
    assert sum(out["split"]) == sum(j.sequences for j in jobs)


def test_the_engine_model_prefills_only_what_its_cache_lacks():
    rep = SimReplica("r", LADDER, 512)
    prompt = tuple(range(100))
    rep.submit([Seq(None, prompt, 2)])
    while rep.running or rep.waiting:
        rep.step(0.0)
    again = Seq(None, prompt + (7,) * 40, 2)
    rep.submit([again])
    rep.step(0.0)
    assert again.cached == 96     # six full 16-token blocks of the first prompt


def test_our_router_keeps_follow_up_turns_home_and_the_default_does_not():
    """Conversations arriving one by one (a burst would not do: under a closed loop the default's
    "fewer ongoing requests" sends a turn back to the replica its previous turn just left, which
    is stickiness by accident; in the open loop it is a coin toss)."""
    jobs = st.open_loop(st.TRACES["cpu"]["chat-long"], 1, "lo", {"chat": 2.0}, 10.0)
    home = {}
    for router in ("ours", "default"):
        recs = rs.run_phase("ladder", 2, router, jobs, ARGS)["records"]
        first = {r["job"]: r["replica"] for r in recs if r["turn"] == 1}
        later = [r for r in recs if r["turn"] > 1]
        home[router] = sum(r["replica"] == first[r["job"]] for r in later) / len(later)
    assert home["ours"] >= 0.9 and home["default"] < home["ours"], home
