"""Ranking of replicas for one request batch by when it would finish there: the pure half of the router.

Contract: `rank_replicas(hint, candidates, now=..., stale_after_s=..., rng=..., outstanding=...,
recent_prefixes=...)` takes opaque, hashable replica keys paired with their parsed `ReplicaStats`
(None when missing or malformed) and returns a `Ranking`: `tiers`, ranks of keys in the shape Ray
Serve's `choose_replicas` returns (most preferred first; one key per rank; every key appears
exactly once); `outcome`, the label for the `ROUTER_DECISIONS` metric (`OUTCOMES`); and
`estimates`, the `Estimate` of every key ranked by one.

No Ray, no torch, no clock, no global randomness: time and the tie-break rng are arguments, so the
policy is deterministic under test. It never raises for bad stats or a bad hint; those degrade to
the "unknown" class and to load-only ranking respectively. Work is O(replicas x prompts x depths).
"""
from __future__ import annotations

import random
from typing import Any, Container, Hashable, Mapping, NamedTuple, Optional, Sequence, TypeVar

from router.buckets import validate_buckets
from router.estimate import NO_SHARED, Estimate, Shared, device_load, estimate, fleet_prior, score
from router.hint import batch_of, coerce_hint  # noqa: F401 (coerce_hint: part of this API)
from router.inflight import Outstanding
from router.stats import ReplicaStats, RoutingHint

K = TypeVar("K", bound=Hashable)

GRAPH_FIT = "graph_fit"  # the first rank admits the batch now and decodes it inside a captured bucket
NO_FIT = "no_fit"        # fresh stats exist, but the first rank would wait, decode eagerly or refuse
NO_STATS = "no_stats"    # a hint was given but no replica has fresh, well-formed stats
NO_HINT = "no_hint"      # the request carried no (valid) RoutingHint: ranked by load only
OUTCOMES = (GRAPH_FIT, NO_FIT, NO_STATS, NO_HINT)

# Two scores are a near tie when the larger is within this of the smaller (relative, plus an
# absolute floor for near-zero estimates): inside a near tie graph fit, then padding decide.
NEAR_TIE_REL = 0.05
NEAR_TIE_ABS_S = 0.001

_NOTHING = Outstanding()


class Ranking(NamedTuple):
    tiers: list[list[Any]]                  # ranks of replica keys, most preferred first
    outcome: str                            # one of OUTCOMES
    estimates: Mapping[Any, Estimate] = {}  # key -> its estimate, for keys ranked by one


def is_usable(stats: Optional[ReplicaStats], now: float, stale_after_s: float) -> bool:
    """Stats are present, well-formed and at most `stale_after_s` away from `now`.

    The distance is taken both ways: the timestamp is the replica's wall clock, so a small skew
    between nodes is tolerated, but a timestamp far in the future is as untrustworthy as an old one.
    """
    if stats is None:
        return False
    try:
        validate_buckets(stats.captured_buckets)
        counts = (stats.running, stats.free_slots, stats.queued, stats.max_seq_len - 1,
                  stats.max_num_seqs - 1)
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            return False
        return abs(now - stats.timestamp) <= stale_after_s  # False for NaN
    except (TypeError, ValueError):  # a hand-built ReplicaStats with wrong types
        return False


def load(stats: ReplicaStats, out: Outstanding = _NOTHING) -> int:
    """Sequences the replica holds: running + queued from its stats, less what this router saw
    finish since them, plus what it sent since them; or everything this router has in flight
    there when that is more (other routers' requests show only in the stats)."""
    published = max(stats.running + stats.queued - out.finished_sequences, 0)
    return max(published + out.recent_sequences, out.sequences)


def rank_replicas(hint: Optional[RoutingHint],
                  candidates: Sequence[tuple[K, Optional[ReplicaStats]]],
                  *, now: float, stale_after_s: float, rng: random.Random,
                  outstanding: Optional[Mapping[K, Outstanding]] = None,
                  recent_prefixes: Optional[Mapping[K, Container[int]]] = None) -> Ranking:
    """Rank replicas for one batch, best first.

    With a hint: replicas with usable stats (`is_usable`) whose `max_seq_len` holds the batch,
    by `score` of their `estimate` (router/estimate.py: the batch's last-token time plus its
    first-token time weighted by 1/n), scores within `NEAR_TIE_REL` of the best remaining one
    forming a near tie decided by graph fit, then a first token within the band, then prefix
    affinity, then padding, then score; then unknown replicas (no,
    stale or malformed stats), by what this router has in flight there; then usable replicas too
    short for the batch (they will refuse it: still listed, so a request that fits nowhere fails
    fast with the replica's error instead of hanging in Ray's backoff), by load.
    Without a hint: usable replicas by `load`, then unknown ones.

    One replica per rank, exact ties broken at random: inside a rank Ray Serve picks the shortest
    live queue counted in *requests*, which would undo a ranking by work (measured: a 284:124
    sequence split in a burst on 2x H200 when replicas shared ranks).

    `outstanding` maps keys to what this router sent there and has not seen complete
    (router/inflight.py); `recent_prefixes` to the prefix hashes it sent there that the stats may
    not show yet. Failure modes: other routers' recent requests are only seen once published (one
    period, 1 s typical). Keys must be hashable and distinct; they are never compared.

    Returns:
        `Ranking(tiers, outcome, estimates)`; `tiers` is empty only when `candidates` is.
    """
    out = outstanding or {}
    draws = [rng.random() for _ in candidates]   # one tie-break draw per candidate, in order
    usable, unknown = [], []
    for i, (_, stats) in enumerate(candidates):
        (usable if is_usable(stats, now, stale_after_s) else unknown).append(i)

    def work(i: int) -> Outstanding:
        return out.get(candidates[i][0]) or _NOTHING

    def by_load(i: int) -> tuple:
        return (load(candidates[i][1], work(i)), draws[i])

    unknown.sort(key=lambda i: (work(i).sequences, work(i).recent_prompt_tokens, draws[i]))
    if hint is None:
        return Ranking(_ranks(candidates, sorted(usable, key=by_load) + unknown), NO_HINT)
    ranked, too_short, ests = _by_estimate(hint, candidates, usable, work, draws, recent_prefixes or {}, now)
    order = ranked + unknown + sorted(too_short, key=by_load)
    if ranked:
        first = ests[ranked[0]]
        outcome = GRAPH_FIT if first.graph and first.waves == 1 else NO_FIT
    else:
        outcome = NO_FIT if too_short else NO_STATS
    return Ranking(_ranks(candidates, order), outcome,
                   {candidates[i][0]: e for i, e in ests.items()})


def _by_estimate(hint: RoutingHint, candidates: Sequence, usable: list[int], work, draws: list[float],
                 recent: Mapping, now: float) -> tuple[list[int], list[int], dict[int, Estimate]]:
    """Indices of usable candidates ordered by estimate (near ties resolved), the indices too
    short for the batch, and the estimates."""
    batch = batch_of(hint)
    prior = fleet_prior(candidates[i][1] for i in usable)
    shared = _shared_by_device(candidates, usable, work, prior, now)
    ests: dict[int, Estimate] = {}
    scored, too_short = [], []
    for i in usable:
        key, stats = candidates[i]
        if hint.max_total_tokens > stats.max_seq_len:
            too_short.append(i)
            continue
        ests[i] = estimate(batch, stats, work(i), prior, recent.get(key) or (),
                           age_s=max(now - stats.timestamp, 0.0), shared=shared.get(i, NO_SHARED))
        scored.append((score(ests[i], batch), draws[i], i))
    return _resolve_near_ties(scored, ests), too_short, ests


def _shared_by_device(candidates: Sequence, usable: list[int], work, prior, now: float) -> dict[int, Shared]:
    """Per usable candidate that shares its GPU with other usable ones (the same non-empty
    `device`), the sum of their `device_load`; replicas alone on a GPU get nothing."""
    groups: dict[str, list[int]] = {}
    for i in usable:
        dev = candidates[i][1].device
        if dev:
            groups.setdefault(dev, []).append(i)
    out: dict[int, Shared] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        loads = {j: device_load(candidates[j][1], work(j), prior, max(now - candidates[j][1].timestamp, 0.0))
                 for j in members}
        for i in members:
            others = [loads[j] for j in members if j != i]
            out[i] = Shared(sum(o.prefill_s for o in others), sum(o.step_s for o in others))
    return out


def _resolve_near_ties(scored: list[tuple[float, float, int]],
                       ests: Mapping[int, Estimate]) -> list[int]:
    """Order by score, except that the scores within `NEAR_TIE_REL` (+ `NEAR_TIE_ABS_S`) of the
    best one not yet placed form a group ordered by graph fit, then a first token no later than the
    same tolerance past the group's earliest, then the batch's uncached prompt tokens there
    (prefix affinity: a follow-up turn saves its history's prefill at its home replica, a saving
    the whole batch's score can hide inside the tolerance), padding rows, score, then draw.
    Why the first token before affinity and padding: a long decode, most of the score, hides tens
    of ms of prefill queue inside the band; padding (nearly free on the step-time curve) or a
    cached prefix already priced in the estimate must not buy a later first token. In
    benchmarks/route_sim.py padding first raised chat TTFT p99 up to 2.6x over the default's."""
    scored.sort()
    order: list[int] = []
    k = 0
    while k < len(scored):
        limit = scored[k][0] * (1.0 + NEAR_TIE_REL) + NEAR_TIE_ABS_S
        j = k
        while j < len(scored) and scored[j][0] <= limit:
            j += 1
        group = scored[k:j]
        first = min(ests[i].first_token_s for _, _, i in group) * (1.0 + NEAR_TIE_REL) + NEAR_TIE_ABS_S
        group.sort(key=lambda x: (not ests[x[2]].graph, ests[x[2]].first_token_s > first,
                                  ests[x[2]].prefill_tokens, ests[x[2]].padding, *x))
        order.extend(i for _, _, i in group)
        k = j
    return order


def _ranks(candidates: Sequence, order: list[int]) -> list[list[Any]]:
    return [[candidates[i][0]] for i in order]
