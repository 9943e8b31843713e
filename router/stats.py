"""The two small contracts between replicas, callers and the router. Pure Python (no torch, no ray).

`ReplicaStats` is what a replica publishes through Ray Serve's `record_routing_stats()`; the router
reads it back from `RunningReplica.routing_stats` (a plain dict, `{}` before the first poll).
`RoutingHint` is what a caller attaches to a request so the router can see its shape without
tokenizing: the replica method takes it as the keyword argument `routing_hint`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class RoutingHint:
    """Shape of one request batch: n sequences, the longest needing `max_total_tokens` KV positions
    (prompt tokens + max new tokens)."""
    num_sequences: int
    max_total_tokens: int


@dataclass(frozen=True)
class ReplicaStats:
    captured_buckets: tuple[int, ...]   # decode batch sizes with a CUDA graph (all buckets on CPU: eager)
    max_seq_len: int                    # longest sequence a KV slot holds
    max_num_seqs: int                   # KV slots in total
    running: int                        # sequences holding a slot now
    free_slots: int                     # slots free now
    queued: int                         # requests waiting for a slot
    graphs: bool                        # True when decode runs by graph replay (CUDA), False on CPU
    fallback: str = "eager"             # "eager" | "queue": what happens past the largest bucket
    timestamp: float = field(default_factory=time.time)  # wall clock when the replica produced it

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["captured_buckets"] = list(self.captured_buckets)
        return d

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> Optional["ReplicaStats"]:
        """Parse published stats; None when missing or malformed (the router then ranks the replica
        as unknown rather than failing)."""
        if not d:
            return None
        try:
            return cls(
                captured_buckets=tuple(sorted(int(b) for b in d["captured_buckets"])),
                max_seq_len=int(d["max_seq_len"]),
                max_num_seqs=int(d["max_num_seqs"]),
                running=int(d["running"]),
                free_slots=int(d["free_slots"]),
                queued=int(d["queued"]),
                graphs=bool(d.get("graphs", False)),
                fallback=str(d.get("fallback", "eager")),
                timestamp=float(d.get("timestamp", 0.0)),
            )
        except (KeyError, TypeError, ValueError):
            return None
