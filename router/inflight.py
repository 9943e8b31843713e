"""What one router has sent to each replica and not yet seen complete, in sequences.

Contract: `InFlight(ttl_s)` keys requests by Ray's internal request id and replicas by any
hashable id. `reserve` counts a request at the replica the router is about to pick (a guess,
kept at most `ttl_s` unless confirmed); `unreserve` drops that guess before the request is
ranked again; `confirm` counts it where Ray actually sent it (moving it if the guess was wrong)
and keeps it until `complete`; `drop_replica` forgets a dead replica.
`counts(now)` gives sequences per replica. Pure Python, no clock of its own, never raises on
unknown ids.

Why reservations: Ray calls `on_request_routed` only after the chosen replica accepted the
request, one RPC later. In a burst, every pending request is ranked before the first acceptance
comes back, so without a reservation each would see the same "idle" replicas and pick alike.
An unconfirmed reservation expires (a request cancelled while routing never completes); by
then the replica's own published stats count the request if it did arrive.
"""
from __future__ import annotations

from typing import Hashable, NamedTuple


class Work(NamedTuple):
    sequences: int
    prompt_tokens: int = 0   # prompt tokens this request adds to the replica's prefill backlog


class Outstanding(NamedTuple):
    sequences: int = 0             # all sequences this router has in flight there
    recent_sequences: int = 0      # of those, sent at or after the replica's stats timestamp
    recent_prompt_tokens: int = 0  # their prompt tokens (uncached there, as estimated when sent)


class InFlight:
    def __init__(self, ttl_s: float):
        self._ttl_s = ttl_s
        self._at: dict[str, tuple[Hashable, int]] = {}     # request id -> (replica, sequences)
        self._expires: dict[str, float] = {}               # unconfirmed request id -> deadline

    def reserve(self, request_id: str, replica: Hashable, n: int, now: float) -> None:
        """Count `n` sequences at `replica` until confirmed, completed or `now + ttl_s`."""
        if request_id in self._at and request_id not in self._expires:
            return  # already confirmed (a late re-rank must not downgrade it)
        self._at[request_id] = (replica, n)
        self._expires[request_id] = now + self._ttl_s

    def unreserve(self, request_id: str) -> None:
        """Drop an unconfirmed reservation (the request is being ranked again); keep a confirmed one."""
        if request_id in self._expires:
            self.complete(request_id)

    def confirm(self, request_id: str, replica: Hashable, n: int) -> None:
        """The request was accepted by `replica`: count it there until `complete`."""
        self._at[request_id] = (replica, n)
        self._expires.pop(request_id, None)

    def complete(self, request_id: str) -> None:
        self._at.pop(request_id, None)
        self._expires.pop(request_id, None)

    def drop_replica(self, replica: Hashable) -> None:
        for rid in [rid for rid, (r, _) in self._at.items() if r == replica]:
            self.complete(rid)

    def counts(self, now: float) -> dict[Hashable, int]:
        """Sequences per replica, after dropping reservations past their deadline."""
        for rid in [rid for rid, t in self._expires.items() if t < now]:
            self.complete(rid)
        out: dict[Hashable, int] = {}
        for replica, n in self._at.values():
            out[replica] = out.get(replica, 0) + n
        return out
