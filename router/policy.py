"""Bucket-aware ranking of replicas for one request batch: the pure half of the router.

Contract: `rank_replicas(hint, candidates, now=..., stale_after_s=..., rng=...)` takes opaque,
hashable replica keys paired with their parsed `ReplicaStats` (None when missing or malformed) and
returns a `Ranking`: `tiers`, ranks of keys in the shape Ray Serve's `choose_replicas` returns
(most preferred first; one key per rank; every key appears exactly once), and
`outcome`, the label for the `ROUTER_DECISIONS` metric (`OUTCOMES`).

No Ray, no torch, no clock, no global randomness: time and the tie-break rng are arguments, so the
policy is deterministic under test. It never raises for bad stats or a bad hint; those degrade to
the "unknown" tier and to load-only ranking respectively.
"""
from __future__ import annotations

import random
from typing import Any, Hashable, Mapping, NamedTuple, Optional, Sequence, TypeVar

from router.buckets import padding_waste, validate_buckets
from router.hint import coerce_hint  # noqa: F401 (part of this module's API)
from router.stats import ReplicaStats, RoutingHint

K = TypeVar("K", bound=Hashable)

GRAPH_FIT = "graph_fit"  # the first rank runs the batch inside a captured bucket
NO_FIT = "no_fit"        # fresh stats exist, but no replica fits the batch in a bucket now
NO_STATS = "no_stats"    # a hint was given but no replica has fresh, well-formed stats
NO_HINT = "no_hint"      # the request carried no (valid) RoutingHint: ranked by load only
OUTCOMES = (GRAPH_FIT, NO_FIT, NO_STATS, NO_HINT)


class Ranking(NamedTuple):
    tiers: list[list[Any]]   # ranks of replica keys, most preferred first
    outcome: str             # one of OUTCOMES


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


def occupancy(stats: ReplicaStats, local: int = 0) -> int:
    """Sequences the replica holds or has waiting: running + queued from its stats, or `local`,
    the sequences this router has in flight there, when that is more (the router's own count is
    fresh; published stats lag by up to one period, so a burst would otherwise all see 'idle')."""
    return max(stats.running + stats.queued, local)


def fits(hint: RoutingHint, stats: ReplicaStats, local: int = 0) -> bool:
    """True when the batch, once admitted, decodes inside a captured bucket on this replica: every
    sequence fits a KV slot, there are free slots for all of them, and the resulting batch
    (`occupancy + n`) is within both the largest captured bucket and `max_num_seqs`."""
    total = occupancy(stats, local) + hint.num_sequences
    return (hint.max_total_tokens <= stats.max_seq_len
            and hint.num_sequences <= stats.free_slots
            and total <= stats.max_num_seqs
            and total <= stats.captured_buckets[-1])


def load(stats: ReplicaStats, local: int = 0) -> int:
    """Sequences the replica is decoding or holding in its admission queue (see `occupancy`)."""
    return occupancy(stats, local)


def rank_replicas(hint: Optional[RoutingHint],
                  candidates: Sequence[tuple[K, Optional[ReplicaStats]]],
                  *, now: float, stale_after_s: float, rng: random.Random,
                  outstanding: Optional[Mapping[K, int]] = None) -> Ranking:
    """Rank replicas for a batch of `hint.num_sequences` sequences.

    Algorithm (with a hint), as a sort key per replica (`_preference`):
      1. Replicas where the batch `fits` (usable stats: fresh and well-formed, `is_usable`) come
         first, by padding waste of the resulting batch (`bucket_for(occ + n) - (occ + n)`,
         occ = `occupancy`), least first, then by `load` (sequences, not requests), least first.
      2. Then unknown replicas (no, stale or malformed stats): they may be idle or brand new
         (`{}` stats before the first poll), so they beat replicas known not to fit.
      3. Then usable non-fits, by load inside each class: those whose largest bucket (and slots)
         could hold the batch once they drain (a capacity wait, then graph replay), then those
         that could only run it eagerly, then those where `max_total_tokens > max_seq_len` (the
         replica will reject the request; still listed so a request that fits nowhere fails
         fast with the replica's error instead of hanging in Ray's routing backoff).
      Without a hint: usable replicas by load, then unknown ones.

    One replica per rank, exact ties broken at random: inside a rank Ray Serve picks the shortest
    live queue counted in *requests* (first listed on a tie), so a replica holding 16 one-prompt
    requests would lose to one holding three 60-prompt batches if both shared a rank (measured: a
    284:124 sequence split in a burst on 2x H200). With one per rank our sequence order stands;
    Ray's queue length only gates on `max_ongoing_requests`, and the router can count a request
    at the replica it ranked first before Ray confirms it (router/inflight.py).

    `outstanding` maps keys to the sequences this router has sent there and not yet seen complete;
    it bounds occupancy from below, so a burst between two stats publishes does not pile onto the
    replica that looked idle. Failure modes: other routers' (other callers') recent requests are
    only seen once published (one period, 1 s typical). Keys must be hashable and distinct; they
    are never compared with each other.

    Returns:
        `Ranking(tiers, outcome)`; `tiers` is empty only when `candidates` is.
    """
    local = outstanding or {}
    keyed = []  # (sort key, tie-break, candidate index)
    for i, (key, stats) in enumerate(candidates):
        keyed.append((_preference(hint, stats, local.get(key, 0), now, stale_after_s), rng.random(), i))
    keyed.sort()
    tiers = [[candidates[i][0]] for _, _, i in keyed]
    classes = {pref[0] for pref, _, _ in keyed}
    if hint is None:
        outcome = NO_HINT
    else:
        outcome = GRAPH_FIT if _FIT in classes else (NO_FIT if classes - {_UNKNOWN} else NO_STATS)
    return Ranking(tiers, outcome)


# Preference classes, best first. Unknown replicas (no or stale stats) may be idle or brand new
# (`{}` before the first poll), so they beat replicas known not to fit.
_FIT, _UNKNOWN, _DRAIN, _EAGER, _TOO_SHORT = range(5)


def _preference(hint: Optional[RoutingHint], stats: Optional[ReplicaStats], local: int,
                now: float, stale_after_s: float) -> tuple:
    """Sort key of one replica for this batch: (class, padding waste, load); smaller is better."""
    if not is_usable(stats, now, stale_after_s):
        return (_UNKNOWN, 0, 0)
    occ = occupancy(stats, local)
    if hint is None:   # no shape to fit: every usable replica is a candidate, by load
        return (_FIT, 0, occ)
    n = hint.num_sequences
    if fits(hint, stats, local):
        return (_FIT, padding_waste(occ + n, stats.captured_buckets), occ)
    if hint.max_total_tokens > stats.max_seq_len:
        return (_TOO_SHORT, 0, occ)
    if n > min(stats.captured_buckets[-1], stats.max_num_seqs):
        return (_EAGER, 0, occ)
    return (_DRAIN, 0, occ)
