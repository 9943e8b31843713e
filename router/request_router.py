"""Ray Serve request router that sends each request batch where it would finish first.

Select it on the decode deployment (YAML or `RequestRouterConfig`):

    request_router_config:
      request_router_class: router.request_router:BucketAwareRequestRouter
      request_router_kwargs: {stale_after_s: 10.0}      # optional; JSON values only
      request_routing_stats_period_s: 1

Contract with the two other parties:
- the replica publishes `ReplicaStats(...).to_dict()` from `record_routing_stats()`; the router
  reads it back from `RunningReplica.routing_stats` (`{}` before the first poll);
- the caller (the ingress, which tokenizes) passes the batch shape as the keyword argument
  `routing_hint`: a `RoutingHint` or a dict with its fields, e.g.
  `handle.generate.remote(batch, routing_hint=RoutingHint(n, max_total_tokens, prompt_tokens=..,
  max_new_tokens=.., prefix_hashes=.., samples_per_prompt=..))`. The replica method therefore
  takes `routing_hint=None` as a keyword argument (and may ignore it).
docs/routing-estimate.md says what each field means and who computes it.

Ranking is `router.policy.rank_replicas`; this module adapts Ray's objects to it and keeps the
router's ledger (router/inflight.py): the work and prompt prefixes it sent each replica, reserved
when it ranks a request, confirmed by `on_request_routed`, ended by `on_request_completed`.
Published stats are parsed once per published dict (Ray hands over a new dict per publish), so a
ranking costs O(replicas x prompts x depths) plus one pass over the ledger. Guarantees:
`choose_replicas` never raises (an exception there hangs the request inside Ray; on any error
it logs and returns every candidate in one shuffled rank) and never blocks (no `ray.get`, no I/O).
Missing, malformed or stale stats and a missing or malformed hint degrade the ranking, not the
request. `initialize_state` never raises either: a router that fails to initialize hangs every
request of its handle, so bad kwargs are logged and replaced by defaults.

No FIFOMixin, on purpose: with it, Ray hands the replica chosen for request A to the *oldest*
pending request, whose shape may differ, which defeats shape-aware routing under load. The base
class assigns the replica to the request it was chosen for (by internal request id), as Ray's
own prompt-aware routers do. No LocalityMixin either: its node/AZ ranks would have to be merged
with the bucket ranks, and one GPU replica per node makes locality matter little here.

The class is cloudpickled *by value* into every caller (driver, ingress replicas, proxy), so this
module imports only `ray.serve` and `router.*` (importable in callers, pickled by reference),
never torch.
"""
from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from typing import Any, Callable, List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from router import metrics as gs_metrics
from router.hint import batch_of
from router.inflight import InFlight, Work
from router.policy import coerce_hint, is_usable, rank_replicas
from router.stats import ReplicaStats, RoutingHint

logger = logging.getLogger("ray.serve")

HINT_KWARG = "routing_hint"
DEFAULT_STALE_AFTER_S = 10.0
DEFAULT_RESERVATION_TTL_S = 5.0
DEFAULT_NEW_REPLICA_IDLE_S = 10.0
PREFIX_SUMMARY_LAG_S = 1.0     # summary age assumed when a replica does not publish its build time
_ERROR_LOG_PERIOD_S = 60.0
_COUNTED_IDS_MAX = 4096

# Lazily created ROUTER_DECISIONS counter. "Once per process" holds per copy of this module: each
# by-value unpickle (one per router) brings its own globals, so a process with several handles
# may create the same-named counter more than once, which Ray allows.
_decisions_counter: Any = None
_metric_failed = False


def _record_outcome(outcome: str) -> None:
    """Count one routing decision; never raises, gives up for good after the first failure."""
    global _decisions_counter, _metric_failed
    if _metric_failed:
        return
    try:
        if _decisions_counter is None:
            _decisions_counter = gs_metrics.make_ray_metric(gs_metrics.ROUTER_DECISIONS)
        _decisions_counter.inc(1, tags={"outcome": outcome})
    except Exception:
        _metric_failed = True
        logger.warning("graphserve router: metric %s disabled in this process",
                       gs_metrics.ROUTER_DECISIONS.name, exc_info=True)


class BucketAwareRequestRouter(RequestRouter):
    """Ranks replicas by when the request batch would finish there (router/estimate.py).

    Configured by `initialize_state(stale_after_s=10.0, seed=None)`; see the module docstring for
    the stats/hint contract and `router.policy.rank_replicas` for the algorithm.
    """

    def initialize_state(self, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                         seed: Optional[int] = None,
                         clock: Optional[Callable[[], float]] = None,
                         record_outcome: Optional[Callable[[str], None]] = None,
                         peers: int = 1,
                         new_replica_idle_s: float = DEFAULT_NEW_REPLICA_IDLE_S,
                         **unknown: Any) -> None:
        """Set the configuration; never raises.

        Args:
            stale_after_s: stats older than this (seconds, replica wall clock) rank as unknown.
                Keep it several `request_routing_stats_period_s` long.
            seed: seed of the tie-break rng (None: nondeterministic).
            clock: wall-clock source, for tests only (default `time.time`, the clock replicas
                stamp their stats with).
            record_outcome: metric sink, for tests only (default: the ROUTER_DECISIONS counter).
            peers: routers sharing the traffic, one per ingress replica (the app sets it from
                `ingress_replicas`). Each sees only its own sends until the replicas' next stats,
                so it counts its recent work `peers` times (Outstanding.with_peers); without
                that, two ingresses pick the same replica in the same window
                (benchmarks/route_sim.py --ingresses).
            new_replica_idle_s: for this long after Ray first offers a replica that has not
                published stats yet, rank it as an idle copy of its freshest peer
                (`_new_replicas_as_idle`); 0 ranks it as unknown (after every replica with stats).
        """
        if unknown:
            logger.error("graphserve router: ignoring unknown request_router_kwargs %s; "
                         "accepted: stale_after_s, seed, peers, new_replica_idle_s", sorted(unknown))
        if isinstance(stale_after_s, bool) or not isinstance(stale_after_s, (int, float)) \
                or not stale_after_s > 0:
            logger.error("graphserve router: stale_after_s=%r must be a positive number of "
                         "seconds; using %s", stale_after_s, DEFAULT_STALE_AFTER_S)
            stale_after_s = DEFAULT_STALE_AFTER_S
        if seed is not None and not isinstance(seed, (int, str)):
            logger.error("graphserve router: seed=%r must be an int or null; ignoring it", seed)
            seed = None
        if isinstance(peers, bool) or not isinstance(peers, int) or peers < 1:
            logger.error("graphserve router: peers=%r must be a positive int; using 1", peers)
            peers = 1
        if isinstance(new_replica_idle_s, bool) or not isinstance(new_replica_idle_s, (int, float)) \
                or not 0 <= new_replica_idle_s < float("inf"):
            logger.error("graphserve router: new_replica_idle_s=%r must be a number of seconds "
                         ">= 0; using %s", new_replica_idle_s, DEFAULT_NEW_REPLICA_IDLE_S)
            new_replica_idle_s = DEFAULT_NEW_REPLICA_IDLE_S
        self._peers = peers
        self._new_replica_idle_s = float(new_replica_idle_s)
        self._first_seen = getattr(self, "_first_seen", {})   # replica id -> first offered (clock)
        self._stale_after_s = float(stale_after_s)
        self._rng = random.Random(seed)
        self._clock = clock or time.time
        self._record_outcome = record_outcome or _record_outcome
        self._counted_ids: OrderedDict[str, None] = OrderedDict()
        self._last_error_log_s = float("-inf")
        # What this router sent (or is about to send) to each replica id and its stats may not show
        # yet: work in flight and prompt prefixes (router/inflight.py).
        self._inflight = InFlight(DEFAULT_RESERVATION_TTL_S, keep_prefixes_s=self._stale_after_s)
        # Parsed stats per replica id, with the published dict they came from: Ray hands over a new
        # dict per publish, so parsing (and the prefix set) happens once per publish, not per request.
        self._parsed: dict[Any, tuple[Any, Optional[ReplicaStats]]] = {}

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        """Ranks of candidates, best first; on any internal error, one shuffled rank of all."""
        try:
            return self.rank_candidates(candidate_replicas, pending_request)
        except Exception:
            self._log_error()
            return self._fallback(candidate_replicas)

    def rank_candidates(self, candidate_replicas: List[RunningReplica],
                        pending_request: Optional[PendingRequest]) -> List[List[RunningReplica]]:
        """The synchronous body of `choose_replicas` (may raise; the caller guards it)."""
        replicas = list(candidate_replicas)
        hint = coerce_hint(_hint_arg(pending_request))
        now = self._clock()
        rid = _request_id(pending_request)
        if rid:
            self._inflight.unreserve(rid)  # a re-rank (backoff, rejection) must not count itself
        stats = self._read_all_stats(replicas)
        ids = [r.replica_id for r in replicas]
        since = {rep: s.timestamp for rep, s in zip(ids, stats) if s is not None}
        summarised = {rep: _summary_time(s) for rep, s in zip(ids, stats) if s is not None}
        stats = self._new_replicas_as_idle(replicas, stats, now)   # after `since`: see there
        sent = self._inflight.outstanding(now, since)
        if self._peers > 1:
            sent = {rep: o.with_peers(self._peers) for rep, o in sent.items()}
        # A replica's prefix summary is rebuilt less often than its stats are taken: keep our own
        # record of prefixes sent there until the summary was built after they completed.
        prefixes = self._inflight.prefixes(now, summarised)
        ranking = rank_replicas(hint, list(enumerate(stats)), now=now,
                                stale_after_s=self._stale_after_s, rng=self._rng,
                                outstanding={i: sent.get(rep) for i, rep in enumerate(ids)},
                                recent_prefixes={i: prefixes.get(rep) for i, rep in enumerate(ids)})
        self._count_once(pending_request, ranking.outcome)
        tiers = [[replicas[i] for i in tier] for tier in ranking.tiers]
        if rid and tiers:  # Ray takes the first rank's replica unless it is full: count it there now
            first = ranking.tiers[0][0]
            est = ranking.estimates.get(first)
            work = _work(hint, est.prefill_tokens if est is not None else None)
            self._inflight.reserve(rid, ids[first], work, now, _hashes(hint))
        return tiers

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        """Ray's hook for a changed replica set: note when each replica was first offered."""
        try:
            now = self._clock()
            seen = self._first_seen
            self._first_seen = {r.replica_id: seen.get(r.replica_id, now) for r in replicas}
        except Exception:
            pass  # before initialize_state, or a replica without an id: bookkeeping only
        super().update_replicas(replicas)

    def _new_replicas_as_idle(self, replicas: List[RunningReplica],
                              stats: List[Optional[ReplicaStats]], now: float) -> List[Optional[ReplicaStats]]:
        """Stats for replicas that have not published yet (`{}`, as Ray hands them over before the
        first poll), for `new_replica_idle_s` after they were first offered: the freshest usable
        peer's shape with nothing running (`ReplicaStats.idle_like`). Ray offers a replica only
        once its constructor (engine ready) and first health check passed, so it is idle; what
        this router sends it counts in full on top (it has no stats timestamp in `since`), so a
        burst does not pile onto it. Without this a new replica ranked after every replica with
        stats until its first stats reached this router: Ray polls a new replica at once, so
        that is a control-loop period and two round trips, longer when the controller or the
        replica is busy, and a burst in it skipped the new replica. Past the window, or with no
        usable peer to copy, such a replica ranks as unknown again: one that never publishes is
        not trusted."""
        if self._new_replica_idle_s <= 0 or not any(s is None for s in stats):
            return stats
        peers = [s for s in stats if s is not None and is_usable(s, now, self._stale_after_s)]
        if not peers:
            return stats
        template = max(peers, key=lambda s: s.timestamp)
        out = list(stats)
        for k, (r, s) in enumerate(zip(replicas, stats)):
            if s is None and _never_published(r):
                first = self._first_seen.setdefault(r.replica_id, now)
                if now - first <= self._new_replica_idle_s:
                    out[k] = template.idle_like(now)
        return out

    def _read_all_stats(self, replicas: List[RunningReplica]) -> List[Optional[ReplicaStats]]:
        """Each replica's parsed stats (None when missing, malformed or unreadable), reusing the
        parse of an unchanged published dict; forgets replicas no longer offered."""
        parsed, out = {}, []
        for r in replicas:
            try:
                raw = r.routing_stats
            except Exception:
                raw = None
            hit = self._parsed.get(r.replica_id)
            if hit is None or hit[0] is not raw:
                hit = (raw, _parse_stats(raw))
            parsed[r.replica_id] = hit
            out.append(hit[1])
        self._parsed = parsed
        return out

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        """Count the batch's work on the replica that accepted it until it completes (its reserved
        work when that is the replica it was reserved at; else all its prompt tokens)."""
        try:
            rid = _request_id(pending_request)
            if rid:
                hint = coerce_hint(_hint_arg(pending_request))
                self._inflight.confirm(rid, replica_id, _work(hint, None), self._clock(),
                                       _hashes(hint))
        except Exception:
            pass  # bookkeeping must never break routing

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        try:
            self._inflight.complete(internal_request_id, self._clock())
        except Exception:
            pass

    def on_replica_actor_died(self, replica_id: Any) -> None:
        try:
            self._inflight.drop_replica(replica_id)
        except Exception:
            pass
        super().on_replica_actor_died(replica_id)

    def _count_once(self, pending_request: Optional[PendingRequest], outcome: str) -> None:
        """Emit the outcome metric once per request (its first routing attempt), not once per
        backoff retry; calls without a request are not counted. Never raises."""
        try:
            rid = _request_id(pending_request)
            if not rid or rid in self._counted_ids:
                return
            self._counted_ids[rid] = None
            if len(self._counted_ids) > _COUNTED_IDS_MAX:
                self._counted_ids.popitem(last=False)
            self._record_outcome(outcome)
        except Exception:
            pass  # metrics must never break routing

    def _fallback(self, candidate_replicas: Any) -> List[List[RunningReplica]]:
        try:
            replicas = list(candidate_replicas)
            random.shuffle(replicas)
            return [replicas] if replicas else []
        except Exception:
            return []  # Ray backs off and calls again; better than raising

    def _log_error(self) -> None:
        """Log the current exception with its traceback, at most once per minute."""
        try:
            now = time.monotonic()
            if now - self._last_error_log_s >= _ERROR_LOG_PERIOD_S:
                self._last_error_log_s = now
                logger.exception("graphserve router: ranking failed; routing to any replica")
        except Exception:
            pass


def _hint_arg(pending_request: Optional[PendingRequest]) -> Any:
    """The raw `routing_hint` keyword argument of the request, or None."""
    if pending_request is None:
        return None
    kwargs = getattr(pending_request, "kwargs", None)
    return kwargs.get(HINT_KWARG) if isinstance(kwargs, dict) else None


def _request_id(pending_request: Optional[PendingRequest]) -> Optional[str]:
    metadata = getattr(pending_request, "metadata", None)
    return getattr(metadata, "internal_request_id", None) or None


def _work(hint: Optional[RoutingHint], prefill_tokens: Optional[int]) -> Work:
    """What the request adds to a replica: its sequences (1 without a hint) and the prompt tokens
    it must prefill there (`prefill_tokens` when estimated for that replica, else all of them)."""
    if hint is None:
        return Work(1, 0)
    batch = batch_of(hint)
    return Work(batch.sequences, batch.prompt_tokens if prefill_tokens is None else prefill_tokens)


def _hashes(hint: Optional[RoutingHint]) -> tuple[int, ...]:
    """Every prefix hash of the hint's prompts (the replica holds these prefixes once it ran it)."""
    return tuple(h for pairs in hint.prefix_hashes for _, h in pairs) if hint else ()


def _summary_time(s: ReplicaStats) -> float:
    """When `s.prefix_hashes` was built: published by the replica, else assumed
    PREFIX_SUMMARY_LAG_S before the stats (a peer that does not publish it). Never after them."""
    built = s.prefix_summary_time
    return min(built, s.timestamp) if built > 0 else s.timestamp - PREFIX_SUMMARY_LAG_S


def _never_published(replica: RunningReplica) -> bool:
    """Ray's value before a replica's first stats poll: an empty dict."""
    try:
        raw = replica.routing_stats
        return isinstance(raw, dict) and not raw
    except Exception:
        return False


def _parse_stats(raw: Any) -> Optional[ReplicaStats]:
    """Published stats parsed, or None when missing, malformed or unreadable."""
    try:
        return ReplicaStats.from_dict(raw)
    except Exception:
        return None
