"""The router's ledger of what it sent each replica, until the replica's own stats show it.

Contract: `InFlight(ttl_s, keep_prefixes_s)` keys requests by Ray's internal request id and
replicas by any hashable id. Each live entry holds the request's `Work` (sequences, and the prompt
tokens it adds to the replica's prefill backlog), the prefix hashes of its prompts and the time it
was first sent.
- `reserve` records a request at the replica the router is about to pick (a guess, kept at most
  `ttl_s` unless confirmed); `unreserve` drops that guess before the request is ranked again;
  `confirm` records it where Ray actually sent it (moving it if the guess was wrong) and keeps it
  until `complete`; `drop_replica` forgets a dead replica.
- `complete(rid, now)` ends a request's work. An accepted (confirmed) request stays on record at
  its replica until the time `prefixes` is given for that replica (when its published prefix
  summary was built) reaches the completion, or `keep_prefixes_s` passes: until then its prefix
  hashes count as held there, and its sequences as gone from stats taken while it ran. A
  request that completes before it was confirmed (a rejection, or a reply that beat
  `on_request_routed`) is dropped, and a late `confirm` of it is ignored unless it was reserved
  again (a retry).
- Views: `counts(now)` gives sequences per replica; `outstanding(now, since)` gives per replica an
  `Outstanding`: all sequences in flight there; the sequences and prompt tokens sent at or after
  `since[replica]` (the timestamp of the stats the ranking reads: what those stats cannot include
  yet), and those requests' send times and prompt tokens one by one; the sequences sent before it
  that completed after it (what those stats still show);
  `prefixes(now, since)` gives per replica the hashes of prompts sent there.
Pure Python, no clock of its own, never raises on unknown ids. Views cost O(requests recorded at
a replica since its stats + replicas) plus, amortized, O(1) per completed request; `counts` and a
replica without stats, O(live requests there).

Why reservations: Ray calls `on_request_routed` only after the chosen replica accepted the
request, one RPC later. In a burst, every pending request is ranked before the first acceptance
comes back, so without a reservation each would see the same "idle" replicas and pick alike.
An unconfirmed reservation expires (a request cancelled while routing never completes); by
then the replica's own published stats count the request if it did arrive.
"""
from __future__ import annotations

from collections import Counter, OrderedDict, deque
from typing import Hashable, Iterable, Mapping, NamedTuple

MAX_COMPLETED = 4096   # completed requests whose prefixes are kept, per replica (oldest dropped)


class Work(NamedTuple):
    sequences: int
    prompt_tokens: int = 0   # prompt tokens this request adds to the replica's prefill backlog


class Outstanding(NamedTuple):
    sequences: int = 0             # all sequences this router has in flight there
    recent_sequences: int = 0      # of those, sent at or after the replica's stats timestamp
    recent_prompt_tokens: int = 0  # their prompt tokens (uncached there, as estimated when sent)
    finished_sequences: int = 0    # sent before the stats timestamp, completed after it
    # The recent requests one by one, in send order: (seconds after the stats timestamp, prompt
    # tokens), so the estimate can drain the prefill queue over time (router/estimate.py).
    recent_sends: tuple[tuple[float, int], ...] = ()

    def with_peers(self, peers: int) -> "Outstanding":
        """As one of `peers` routers that split the requests evenly (one per ingress replica)
        should read it: the others' sends since the stats are as invisible as they are likely,
        so the recent work (and the completions the stats missed) counts `peers` times; this
        router's own live sequences stay as they are."""
        if peers <= 1:
            return self
        return self._replace(recent_sequences=self.recent_sequences * peers,
                             recent_prompt_tokens=self.recent_prompt_tokens * peers,
                             finished_sequences=self.finished_sequences * peers,
                             recent_sends=tuple((age, tokens * peers) for age, tokens in self.recent_sends))


class _Done(NamedTuple):
    completed_at: float
    sent_at: float
    sequences: int
    hashes: tuple[int, ...]


class _Entry(NamedTuple):
    replica: Hashable
    work: Work
    hashes: tuple[int, ...]
    sent_at: float
    expires: float | None      # None once confirmed
    added_at: float            # when it was recorded at this replica (>= sent_at)


class InFlight:
    def __init__(self, ttl_s: float, keep_prefixes_s: float = 10.0):
        self._ttl_s = ttl_s
        self._keep_s = keep_prefixes_s
        self._at: dict[str, _Entry] = {}                              # live requests
        # The same entries by replica in the order they were added there (`added_at` ascending),
        # with their sequence sums, and the unconfirmed ones' deadlines: views read only the
        # entries added since a replica's stats, not every live request.
        self._by_replica: dict[Hashable, dict[str, _Entry]] = {}
        self._sequences: dict[Hashable, int] = {}
        self._deadlines: dict[str, float] = {}
        self._done: dict[Hashable, deque[_Done]] = {}                 # completed, oldest first
        self._hashes: dict[Hashable, Counter] = {}                    # replica -> hash -> holders
        self._ended: OrderedDict[str, None] = OrderedDict()           # completed before confirmed

    def reserve(self, request_id: str, replica: Hashable, work: Work, now: float,
                hashes: Iterable[int] = ()) -> None:
        """Count `work` at `replica` until confirmed, completed or `now + ttl_s`."""
        e = self._at.get(request_id)
        if e is not None and e.expires is None:
            return  # already confirmed (a late re-rank must not downgrade it)
        self._ended.pop(request_id, None)   # ranked again: a retry, not a finished request
        self._remove(request_id)
        self._add(request_id, _Entry(replica, work, tuple(hashes), now, now + self._ttl_s, now))

    def unreserve(self, request_id: str) -> None:
        """Drop an unconfirmed reservation (the request is being ranked again); keep a confirmed one."""
        e = self._at.get(request_id)
        if e is not None and e.expires is not None:
            self._remove(request_id)

    def confirm(self, request_id: str, replica: Hashable, work: Work, now: float,
                hashes: Iterable[int] = ()) -> None:
        """The request was accepted by `replica`: count it there until `complete`. A reservation at
        the same replica keeps its own work (estimated for that replica) and send time."""
        if request_id in self._ended:
            del self._ended[request_id]
            return  # it already completed
        e = self._at.get(request_id)
        if e is not None and e.replica == replica:
            self._at[request_id] = self._by_replica[replica][request_id] = e._replace(expires=None)
            self._deadlines.pop(request_id, None)
            return
        self._remove(request_id)
        sent_at = e.sent_at if e is not None else now
        self._add(request_id, _Entry(replica, work, tuple(hashes), sent_at, None, now))

    def complete(self, request_id: str, now: float) -> None:
        e = self._remove(request_id)
        if e is None:
            return
        if e.expires is not None:   # never confirmed: rejected, or its reply beat on_request_routed
            self._ended[request_id] = None
            if len(self._ended) > MAX_COMPLETED:
                self._ended.popitem(last=False)
        else:
            self._count(e.replica, e.hashes, +1)
            done = self._done.setdefault(e.replica, deque())
            done.append(_Done(now, e.sent_at, e.work.sequences, e.hashes))
            if len(done) > MAX_COMPLETED:
                self._count(e.replica, done.popleft().hashes, -1)

    def drop_replica(self, replica: Hashable) -> None:
        for rid in list(self._by_replica.get(replica, ())):
            self._remove(rid)
        self._done.pop(replica, None)
        self._hashes.pop(replica, None)

    def counts(self, now: float) -> dict[Hashable, int]:
        """Sequences per replica, after dropping reservations past their deadline."""
        return {r: o.sequences for r, o in self.outstanding(now, {}).items()}

    def outstanding(self, now: float, since: Mapping[Hashable, float]) -> dict[Hashable, Outstanding]:
        """Per replica: all live sequences; the sequences and prompt tokens sent at or after
        `since[replica]` (every live request counts as recent for a replica not in `since`); the
        sequences sent before `since[replica]` and completed after it."""
        self._prune(now, {})   # completed requests stay for `prefixes`, whose times may be older
        out: dict[Hashable, list] = {}
        for replica, entries in self._by_replica.items():
            o = out[replica] = [self._sequences[replica], 0, 0, 0, []]
            t = since.get(replica)
            measured = t is not None and t == t          # a stats time to measure from (not NaN)
            for e in reversed(entries.values()) if measured else entries.values():
                if measured and e.added_at < t:
                    break                                # it and all before it: sent before t
                if measured and e.sent_at < t:
                    continue                             # a moved reservation sent before t
                o[1] += e.work.sequences
                o[2] += e.work.prompt_tokens
                if measured:
                    o[4].append((e.sent_at - t, e.work.prompt_tokens))
        for replica, done in self._done.items():
            t = since.get(replica)
            if t is not None:   # sent before the stats, completed after them: still in them
                gone = sum(d.sequences for d in done if d.sent_at < t < d.completed_at)
                if gone:
                    out.setdefault(replica, [0, 0, 0, 0, []])[3] += gone
        return {rep: Outstanding(*o[:4], tuple(sorted(o[4]))) for rep, o in out.items()}

    def prefixes(self, now: float, since: Mapping[Hashable, float]) -> Mapping[Hashable, Counter]:
        """Per replica, the prefix hashes (with multiplicity) of prompts sent there that its prefix
        summary may not show yet: live requests, and completed ones until `since[replica]` (when
        that summary was built) reaches their completion. A read-only view: callers must not
        modify it."""
        self._prune(now, since)
        return self._hashes

    # -- bookkeeping ------------------------------------------------------------------------------
    def _prune(self, now: float, since: Mapping[Hashable, float]) -> None:
        """Drop expired reservations, and completed requests that a replica's prefix summary built
        at `since[replica]`, at or after their completion, covers (or older than `keep_prefixes_s`)."""
        for rid in [rid for rid, deadline in self._deadlines.items() if deadline < now]:
            self._remove(rid)
        for replica, done in list(self._done.items()):
            t = since.get(replica)
            while done and (now - done[0].completed_at > self._keep_s
                            or (t is not None and t >= done[0].completed_at)):
                self._count(replica, done.popleft().hashes, -1)
            if not done:
                del self._done[replica]

    def _add(self, request_id: str, e: _Entry) -> None:
        self._at[request_id] = e
        self._by_replica.setdefault(e.replica, {})[request_id] = e
        self._sequences[e.replica] = self._sequences.get(e.replica, 0) + e.work.sequences
        if e.expires is not None:
            self._deadlines[request_id] = e.expires
        self._count(e.replica, e.hashes, +1)

    def _remove(self, request_id: str) -> _Entry | None:
        e = self._at.pop(request_id, None)
        if e is not None:
            entries = self._by_replica[e.replica]
            del entries[request_id]
            self._sequences[e.replica] -= e.work.sequences
            if not entries:
                del self._by_replica[e.replica], self._sequences[e.replica]
            self._deadlines.pop(request_id, None)
            self._count(e.replica, e.hashes, -1)
        return e

    def _count(self, replica: Hashable, hashes: tuple[int, ...], sign: int) -> None:
        if not hashes:
            return
        c = self._hashes.setdefault(replica, Counter())
        for h in hashes:
            n = c[h] + sign
            if n > 0:
                c[h] = n
            else:
                c.pop(h, None)
        if not c:
            del self._hashes[replica]
