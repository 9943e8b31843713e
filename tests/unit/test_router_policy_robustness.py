"""The pure routing policy (router/policy.py) under randomness and bad input: exact ties are
broken at random (one replica per rank, every candidate once), the same seed gives the same
ranking, and 500 random fleets with odd stats and hints (NaN, negatives, huge, wrong types) never
raise and keep the ranking's invariants (router_fakes.rank checks them on every call)."""
from __future__ import annotations

import random
from collections import Counter

from router_fakes import NOW, STALE, hint, no_ray_init, rank, stats  # noqa: F401 (no_ray_init: autouse)

from router.policy import GRAPH_FIT, rank_replicas
from router.stats import RoutingHint


def test_equal_candidates_are_not_always_resolved_to_the_first():
    cands = [(name, stats()) for name in ("a", "b", "c")]
    rng = random.Random(1234)
    firsts = Counter(
        rank_replicas(hint(1), cands, now=NOW, stale_after_s=STALE, rng=rng).tiers[0][0]
        for _ in range(3000))
    assert set(firsts) == {"a", "b", "c"}
    assert all(800 < c < 1200 for c in firsts.values()), firsts  # ~1000 each


def test_same_seed_same_ranking():
    cands = [(name, stats()) for name in "abcdef"] + [("u1", None), ("u2", None)]
    assert rank(hint(1), cands, seed=7).tiers == rank(hint(1), cands, seed=7).tiers


def test_random_inputs_never_raise_and_keep_invariants():
    rng = random.Random(0)
    for case in range(500):
        cands = []
        for i in range(rng.randint(0, 6)):
            if rng.random() < 0.2:
                cands.append((f"r{i}", None))
                continue
            buckets = tuple(sorted(rng.sample(range(1, 65), rng.randint(1, 5))))
            if rng.random() < 0.1:
                buckets = buckets[::-1]
            slots = rng.randint(1, 80)
            running = rng.randint(-1, slots)
            cands.append((f"r{i}", stats(buckets, running=running, queued=rng.randint(0, 5),
                                         max_num_seqs=slots, free_slots=rng.randint(-1, slots),
                                         max_seq_len=rng.randint(0, 4096),
                                         timestamp=NOW - rng.uniform(-20, 20), **_v2_stats(rng))))
        h = None if rng.random() < 0.2 else _v2_hint(rng)
        r = rank(h, cands, seed=case)
        if r.outcome == GRAPH_FIT:
            first = r.estimates[r.tiers[0][0]]
            assert first.graph and first.waves == 1


_ODD = (0, -1, 1.5, float("nan"), float("inf"), 10**30, "x", None)


def _odd(rng, usual):
    return rng.choice(_ODD) if rng.random() < 0.15 else usual


def _v2_stats(rng) -> dict:
    steps = {rng.choice((1, 2, 4, 8, 16, 64, 0, -3)): _odd(rng, rng.uniform(0.001, 0.05))
             for _ in range(rng.randint(0, 4))}
    return dict(block_size=_odd(rng, 16), total_blocks=_odd(rng, 1000), free_blocks=_odd(rng, 500),
                prefill_backlog_tokens=_odd(rng, rng.randint(0, 10**6)),
                decode_rows=_odd(rng, 3), prefill_tokens_per_s=_odd(rng, rng.uniform(0, 1e5)),
                decode_step_s=_odd(rng, steps),
                prefix_hashes=_odd(rng, tuple(rng.randint(0, 50) for _ in range(rng.randint(0, 20)))))


def _v2_hint(rng) -> RoutingHint:
    n = rng.randint(1, 70)
    prompts = tuple(tuple((d, rng.randint(0, 50)) for d in (1, 2, 4)) for _ in range(rng.randint(0, 3)))
    return RoutingHint(n, rng.randint(1, 5000), prompt_tokens=rng.choice((0, 1, n * 300, 10**40)),
                       max_new_tokens=rng.choice((0, n, n * 200, 10**40)), prefix_hashes=prompts,
                       samples_per_prompt=rng.choice((1, 2, 10**9)))
