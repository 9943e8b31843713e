"""benchmarks/serve_traces.py and serve_report.py: the pure halves of serve_load (no Ray)."""
from __future__ import annotations

import pytest

from benchmarks import serve_report as R
from benchmarks import serve_traces as T


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_traces_are_seeded_fit_their_context_and_offer_the_asked_rate(device):
    limit = {"gpu": 8192, "cpu": 512}[device]       # serve_load's --max-seq-len defaults
    for t in T.TRACES[device].values():
        assert T.longest_sequence(t) <= limit
        assert T.burst(t, 1) == T.burst(t, 1) != T.burst(t, 2)
        rates = T.rates_for(t, 1000.0, http_cap=1e9)
        offered = sum(r * T.mean_output(t, k) for k, r in rates.items() if k in ("interactive", "batch", "chat"))
        assert offered == pytest.approx(1000.0)
        jobs = T.open_loop(t, 0, "lo", rates, 5.0)
        assert jobs == T.open_loop(t, 0, "lo", rates, 5.0) and all(0 <= j.at < 5.0 for j in jobs)


def test_the_http_cap_moves_offered_tokens_to_batch_jobs():
    t = T.TRACES["gpu"]["mix"]
    r = T.rates_for(t, 100_000.0, http_cap=10.0)
    assert r["interactive"] == 10.0 and r["http_capped"]
    assert r["interactive"] * T.mean_output(t, "interactive") + r["batch"] * T.mean_output(t, "batch") \
        == pytest.approx(100_000.0)


def test_a_floor_keeps_an_open_loop_from_being_empty():
    for t in T.TRACES["gpu"].values():
        r = T.rates_for(t, 1.0, http_cap=40.0, min_jobs_per_s=2.0)
        assert r["floored"] and sum(r.get(k, 0) for k in ("interactive", "batch", "chat")) == pytest.approx(2.0)
        assert not T.rates_for(t, 1e6, http_cap=1e6, min_jobs_per_s=2.0)["floored"]


def test_chat_conversations_share_system_prefixes_within_a_seed():
    t = T.TRACES["gpu"]["chat"]
    firsts = [j.prompts[0] for j in T.burst(t, 0)]
    systems = T.Draw(t, 0, "x").systems
    shared = [f for f in firsts if any(f[:len(s)] == s for s in systems)]
    assert len(firsts) > len(shared) > len(firsts) // 2
    assert all(len(j.turns) == t.chat.turns - 1 for j in T.burst(t, 0))


def rec(kind, send, first=None, last=None, tokens=0, **kw):
    return {"kind": kind, "t_send": send, "t_first": first, "t_last": last, "tokens": tokens, "done": first is not None,
            "error": None, **kw}


def counters(replica, rank, steps, sizes, hit, queried, padded):
    return {"replica": replica, "rank": rank, "captured_buckets": [1, 2, 4], "decode_steps": steps,
            "batch_sizes": sizes, "prefix_hit_tokens": hit, "prefix_queried_tokens": queried,
            "padded_rows": {"4": padded}, "generated_tokens": 7 * rank}


def test_phase_metrics_count_cut_sequences_and_read_the_replica_counters():
    before = [counters("a", 0, [], {}, 0, 0, 0), counters("b", 1, [], {}, 0, 0, 0)]
    after = [counters("a", 0, [[4, "graph", 10]], {3: 1}, 30, 100, 10), counters("b", 1, [[1, "eager", 10]], {1: 2}, 0, 50, 0)]
    d = R.replica_delta(before, after)
    assert d["split"] == [3, 2] and d["graph_hit"] == 0.5 and d["rows_run"] == 50
    recs = [rec("interactive", 0.0, 0.1, 1.1, 11), rec("chat", 0.0, 0.2, 0.2, 1, turn=2),
            rec("batch", 0.0, cut=2.0)]                                   # cut before its first token
    m = R.phase_metrics(recs, 0.0, 2.0, d, generated=20)
    assert m["tokens_per_s"] == 10.0 and m["client_tokens_per_s"] == 6.0       # replicas' count vs client's
    assert R.phase_metrics(recs, 0.0, 2.0, d)["tokens"] == 0                     # 7 * 1 - 7 * 1 in the delta
    assert m["padding_waste"] == 10 / 50 and m["prefix_hit_rate"] == 0.2
    assert m["all"]["censored_ttft"] == 1 and m["all"]["cut"] == 1
    assert m["batch"]["ttft_ms_p50"] == pytest.approx(2000.0)           # a lower bound
    assert m["interactive"]["sequences"] == 2 and m["chat_followup"]["sequences"] == 1
    assert m["interactive"]["tpot_ms_p50"] == pytest.approx(100.0)
    assert set(m["samples"]["ttft_ms"]) == {"interactive", "chat_followup", "batch"}


def phase(tokens, wall, ttft_ms, steps=None):
    return {"tokens": tokens, "wall_s": wall, "split": [1, 1],
            "samples": {"ttft_ms": {"interactive": ttft_ms, "chat": ttft_ms}, "tpot_ms": {}},
            "replicas": {"decode_steps": steps or {"1:graph": 10}, "padded_rows": 0, "rows_run": 10,
                         "prefix_hit_tokens": 0, "prefix_queried_tokens": 0}}


def test_summary_pools_seeds_over_the_phases_both_routers_ran_and_judges_the_bars():
    ours = {"chat/s0/burst": phase(130, 1.0, [10.0]), "chat/s1/burst": phase(120, 1.0, [10.0]),
            "chat/s0/lo": phase(50, 1.0, [10.0, 20.0]), "chat/s0/hi": phase(50, 1.0, [30.0])}
    dflt = {"chat/s0/burst": phase(100, 1.0, [50.0]), "chat/s1/burst": phase(100, 1.0, [50.0]),
            "chat/s0/lo": phase(50, 1.0, [50.0, 60.0])}                   # hi: not run by default
    res = {"args": {"traces": "chat"}, "routers": {"ours": {"phases": ours}, "default": {"phases": dflt}}}
    s = R.summarize(res)
    assert s["chat"]["burst"]["ratio"]["tokens_per_s"] == pytest.approx(1.25)
    assert s["chat"]["open"]["phases"] == ["chat/s0/lo"]
    b = R.bars(res, s)
    assert b == {"capacity_tokens_per_s_ours>=1.2x_default[chat]": True,
                 "interactive_ttft_p99_ours<=default[chat]": True,
                 "multi_turn_ttft_p50_ours<=0.5x_default[chat]": True, "graph_hit_ours>=0.99": True}
    R.headline(res, s)
    assert res["burst_tokens_per_s_ours_over_default"] == pytest.approx(1.25)
    assert res["padding_waste"] == {"ours": 0.0, "default": 0.0}


def test_chat_long_conversations_carry_a_private_context_that_fits_max_seq_len():
    t = T.TRACES["gpu"]["chat-long"]
    jobs = T.burst(t, 0)
    systems = T.Draw(t, 0, "burst").systems
    for j in jobs:
        first = j.prompts[0]
        system = next((s for s in systems if first[:len(s)] == s), ())
        assert len(first) - len(system) >= t.chat.context[0] + t.chat.first[0]
    heads = {j.prompts[0][:4096] for j in jobs}          # contexts differ between conversations
    assert len(heads) == len(jobs)
    assert T.longest_sequence(t) <= 8192


def test_multi_turn_bar_covers_every_chat_trace():
    def summ(o, d):
        return {"burst": {"ratio": {}}, "open": {"ours": {"chat_ttft_ms_p50": o}, "default": {"chat_ttft_ms_p50": d}}}
    res = {"routers": {}}
    b = R.bars(res, {"chat": summ(40.0, 50.0), "chat-long": summ(20.0, 60.0), "mix": summ(None, None)})
    assert b == {"multi_turn_ttft_p50_ours<=0.5x_default[chat]": False,
                 "multi_turn_ttft_p50_ours<=0.5x_default[chat-long]": True}


def test_replica_side_latency_is_read_from_the_difference_of_two_counter_snapshots():
    """The replicas' own TTFT histograms (counters()) minus the phase-start snapshot, summed over
    replicas and pooled over phases; a replica that reports none (an old peer) adds nothing."""
    from deployments.latency_histogram import BOUNDS_MS, LatencyHistogram

    def hist(*ms):
        h = LatencyHistogram()
        for x in ms:
            h.observe(x / 1e3)
        return h.counts

    base = counters("a", 0, [], {}, 0, 0, 0)
    before = [{**base, "ttft_ms_counts": hist(5000.0)}, counters("b", 1, [], {}, 0, 0, 0)]
    after = [{**base, "ttft_ms_counts": hist(5000.0, 10.0, 10.0, 10.0)},
             {**counters("b", 1, [], {}, 0, 0, 0), "ttft_ms_counts": hist(100.0)}]
    d = R.replica_delta(before, after)
    assert sum(d["ttft_ms_counts"]) == 4 and d["tpot_ms_counts"] == []     # the 5 s one predates the phase
    lat = R.replica_latency(d)
    assert lat["replica_ttft_ms_p50"] == pytest.approx(10.0)
    assert lat["replica_ttft_ms_p99"] == pytest.approx(100.0)
    assert lat["replica_tpot_ms_p50"] is None
    pooled = R.pool([{**phase(10, 1.0, [1.0]), "replicas": {**phase(10, 1.0, [1.0])["replicas"], **d}},
                     {**phase(10, 1.0, [1.0]), "replicas": {**phase(10, 1.0, [1.0])["replicas"],
                                                            "ttft_ms_counts": hist(*[1000.0] * 8)}}])
    assert pooled["replica_ttft_ms_p50"] == pytest.approx(1000.0)        # 8 of 12 at 1 s
    assert BOUNDS_MS[0] == pytest.approx(0.1) and BOUNDS_MS[-1] == pytest.approx(100_000.0)


def test_latency_histogram_percentiles_are_bucket_upper_bounds():
    from deployments.latency_histogram import LatencyHistogram, difference, percentile

    h = LatencyHistogram()
    assert percentile(h.counts, 50) is None
    for ms in (1.0, 2.0, 3.0, 40.0, 1e9):                 # the last one overflows
        h.observe(ms / 1e3)
    assert percentile(h.counts, 50) == pytest.approx(10 ** 0.5)          # 3 ms -> the 3.16 ms bucket
    assert percentile(h.counts, 80) == pytest.approx(10 ** 1.7)          # 40 ms -> 50.1 ms
    assert percentile(h.counts, 100) == pytest.approx(100_000.0)         # overflow reads as the last bound
    assert difference(h.counts, []) == h.counts and sum(difference(h.counts, h.counts)) == 0


def test_bootstrap_interval_holds_the_ratio_and_narrows_with_samples():
    from benchmarks.serve_spread import bootstrap_ratio
    import random
    rng = random.Random(1)
    few_o, few_d = [rng.expovariate(1 / 60) for _ in range(30)], [rng.expovariate(1 / 60) for _ in range(30)]
    many_o, many_d = [rng.expovariate(1 / 60) for _ in range(3000)], [rng.expovariate(1 / 60) for _ in range(3000)]
    few, many = bootstrap_ratio(few_o, few_d, 99, rounds=300), bootstrap_ratio(many_o, many_d, 99, rounds=300)
    for b in (few, many):
        assert b["lo"] <= b["ratio"] <= b["hi"]
    assert many["lo"] <= 1.0 <= many["hi"]                    # same distribution: 1 inside
    assert many["hi"] - many["lo"] < few["hi"] - few["lo"]    # more samples, tighter
    slower = bootstrap_ratio([2 * x for x in many_o], many_d, 50, rounds=300)
    assert 1.6 < slower["lo"] <= slower["hi"] < 2.5          # a real 2x difference shows as one
    assert bootstrap_ratio([], many_d, 50) is None and bootstrap_ratio(many_o, [], 50) is None


def test_phase_bootstrap_sees_one_outlier_phase_that_request_resampling_hides():
    """Six phases of 400 requests each from one distribution for both routers, except that one of
    ours has a slow tail (its replicas' state, shared by its requests). Resampling requests gives a
    narrow interval away from 1; resampling whole phases gives one that holds 1. A 2x slowdown in
    every phase is still told apart; no shared phase gives None."""
    from benchmarks.serve_spread import bootstrap_ratio, bootstrap_ratio_by_phase
    import random
    rng = random.Random(2)
    draw = lambda scale=1.0: [scale * rng.expovariate(1 / 60) for _ in range(400)]  # noqa: E731
    keys = [f"chat/s{s}/{k}" for s in range(3) for k in ("lo", "hi")]
    default = {k: draw() for k in keys}
    ours = {k: draw() for k in keys}
    ours[keys[2]] = ours[keys[2]][:380] + [x * 8 for x in ours[keys[2]][380:]]   # one phase's tail
    pooled = lambda by: [x for v in by.values() for x in v]  # noqa: E731
    by_request = bootstrap_ratio(pooled(ours), pooled(default), 99, rounds=300)
    by_phase = bootstrap_ratio_by_phase(ours, default, 99, rounds=300)
    assert by_phase["ratio"] == pytest.approx(by_request["ratio"]) and by_phase["phases"] == 6
    assert by_request["lo"] > 1.0                              # requests: "ours is worse"
    assert by_phase["lo"] <= 1.0 < by_phase["hi"]              # phases: cannot tell
    assert by_phase["hi"] - by_phase["lo"] > by_request["hi"] - by_request["lo"]
    slower = bootstrap_ratio_by_phase({k: [2 * x for x in v] for k, v in default.items()}, default, 50, rounds=300)
    assert slower["lo"] == pytest.approx(2.0) == slower["hi"]   # paired: the same phases, 2x each
    assert bootstrap_ratio_by_phase({"a": [1.0]}, {"b": [1.0]}, 50) is None
