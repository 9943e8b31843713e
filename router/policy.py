"""Bucket-aware ranking of replicas for one request batch: the pure half of the router.

Contract: `rank_replicas(hint, candidates, now=..., stale_after_s=..., rng=...)` takes opaque,
hashable replica keys paired with their parsed `ReplicaStats` (None when missing or malformed) and
returns a `Ranking`: `tiers`, ranks of keys in the shape Ray Serve's `choose_replicas` returns
(most preferred rank first; every key appears exactly once; empty ranks are never emitted), and
`outcome`, the label for the `ROUTER_DECISIONS` metric (`OUTCOMES`).

No Ray, no torch, no clock, no global randomness: time and the tie-break rng are arguments, so the
policy is deterministic under test. It never raises for bad stats or a bad hint; those degrade to
the "unknown" tier and to load-only ranking respectively.
"""
from __future__ import annotations

import operator
import random
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Optional, Sequence, TypeVar

from router.buckets import padding_waste, validate_buckets
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


def coerce_hint(obj: Any) -> Optional[RoutingHint]:
    """A `RoutingHint` from an instance or a mapping with the same fields; None when absent or
    invalid (non-integer or non-positive fields). Never raises."""
    if obj is None:
        return None
    try:
        if isinstance(obj, RoutingHint):
            n, t = obj.num_sequences, obj.max_total_tokens
        else:
            n, t = obj["num_sequences"], obj["max_total_tokens"]
        if isinstance(n, bool) or isinstance(t, bool):
            return None
        n, t = operator.index(n), operator.index(t)  # ints (numpy ints too), never floats/strings
    except Exception:  # untrusted caller input: any failure just means "no hint"
        return None
    return RoutingHint(n, t) if n >= 1 and t >= 1 else None


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

    Algorithm (with a hint):
      1. Split candidates into *usable* (fresh, well-formed stats; `is_usable`) and *unknown*.
      2. Usable replicas where the batch `fits` form the first ranks, ordered by padding waste of
         the resulting batch (`bucket_for(occ + n) - (occ + n)`, occ = `occupancy`), least waste
         first, then by `load` (sequences, not requests), least first.
      3. Then one rank holding every unknown replica, in random order: it may be idle or brand
         new (`{}` stats before the first poll), so it beats replicas known not to fit.
      4. Then usable non-fits, by load inside each class: those whose largest bucket (and slots)
         could hold the batch once they drain (a capacity wait, then graph replay), then those
         that could only run it eagerly, then those where `max_total_tokens > max_seq_len` (the
         replica will reject the request; still listed so a request that fits nowhere fails
         fast with the replica's error instead of hanging in Ray's routing backoff).
      Without a hint: usable replicas by load, then unknown ones.

    One rank per distinct (class, load), replicas of equal load sharing a rank in random order:
    inside a rank Ray Serve picks the shortest live queue, counted in *requests*, so a replica
    holding 16 single-prompt requests would lose to one holding three 60-prompt batches if both
    shared a rank (measured: a 284:124 sequence split in a burst on 2x H200). Separate ranks keep
    our sequence-load order; Ray's queue length then only gates on `max_ongoing_requests` and
    breaks exact ties (and on equal queue lengths it takes the first listed, hence the shuffle).

    `outstanding` maps keys to the sequences this router has sent there and not yet seen complete;
    it bounds occupancy from below, so a burst between two stats publishes does not pile onto the
    replica that looked idle. Failure modes: other routers' (other callers') recent requests are
    only seen once published (one period, 1 s typical). Keys must be hashable and distinct; they
    are never compared with each other.

    Returns:
        `Ranking(tiers, outcome)`; `tiers` is empty only when `candidates` is.
    """
    local = outstanding or {}
    usable, unknown = [], []
    for key, stats in candidates:
        (usable if is_usable(stats, now, stale_after_s) else unknown).append((key, stats))
    unknown_keys = [key for key, _ in unknown]
    rng.shuffle(unknown_keys)
    occ = {key: occupancy(s, local.get(key, 0)) for key, s in usable}

    def shuffled(items):  # one rank of equals: random order (Ray takes the first on a tie)
        keys = [k for k, _ in items]
        rng.shuffle(keys)
        return keys

    if hint is None:
        tiers = _grouped(usable, lambda k, s: occ[k], shuffled) + [unknown_keys]
        return Ranking([t for t in tiers if t], NO_HINT)

    n = hint.num_sequences
    fit = [(k, s) for k, s in usable if fits(hint, s, local.get(k, 0))]
    rest = [(k, s) for k, s in usable if not fits(hint, s, local.get(k, 0))]
    tiers = _grouped(fit, lambda k, s: (padding_waste(occ[k] + n, s.captured_buckets), occ[k]), shuffled)
    tiers.append(unknown_keys)
    # Non-fits: first those that will hold the batch inside a graph once they drain (stale stats
    # often make a free large-bucket replica look busy), then eager-only ones, then too-short ones.
    tiers += _grouped(rest, lambda k, s: (hint.max_total_tokens > s.max_seq_len,
                                          n > min(max(s.captured_buckets, default=0), s.max_num_seqs),
                                          occ[k]),
                      shuffled)
    outcome = GRAPH_FIT if fit else (NO_FIT if usable else NO_STATS)
    return Ranking([t for t in tiers if t], outcome)


def _grouped(items: list[tuple[K, ReplicaStats]], rank_key: Callable[[K, ReplicaStats], Any],
             order: Callable[[list], list[K]]) -> list[list[K]]:
    """One rank per distinct `rank_key(key, stats)`, ascending; each rank ordered by `order`."""
    groups: dict[Any, list[tuple[K, ReplicaStats]]] = {}
    for k, s in items:
        groups.setdefault(rank_key(k, s), []).append((k, s))
    return [order(groups[rk]) for rk in sorted(groups)]
