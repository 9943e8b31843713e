"""The two small contracts between replicas, callers and the router. Pure Python (no torch, no ray).

`ReplicaStats` is what a replica publishes through Ray Serve's `record_routing_stats()`; the router
reads it back from `RunningReplica.routing_stats` (a plain dict, `{}` before the first poll).
`RoutingHint` is what a caller attaches to a request so the router can see its shape without
tokenizing: the replica method takes it as the keyword argument `routing_hint`.

Both carry what a batch's completion time depends on (docs/routing-estimate.md): the replica its
backlog, free KV, measured rates and a summary of its prefix cache; the hint the batch's prompt
tokens, output budget and prefix hashes. Prefix hashes are `replica.block_hash` values at the
depths of `replica.block_hash.summary_depths` (the router compares them as opaque ints). Every
field added after the first version has a default, so old and new peers interoperate.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any, Mapping, Optional

MAX_PREFIX_HASHES = 4096   # bound on a replica's published prefix summary
MAX_DEVICE_CHARS = 200


@dataclass(frozen=True)
class RoutingHint:
    """Shape of one request batch: n sequences, the longest needing `max_total_tokens` KV positions
    (prompt tokens + max new tokens); optionally what its cost depends on."""
    num_sequences: int
    max_total_tokens: int
    prompt_tokens: int = 0                    # prompt tokens over all sequences (len x n)
    max_new_tokens: int = 0                   # max_tokens over all sequences
    # Per prompt: ((depth in blocks, chained hash of that prefix), ...) at summary depths.
    prefix_hashes: tuple[tuple[tuple[int, int], ...], ...] = ()
    samples_per_prompt: int = 1               # n: each prompt's prefix serves n sequences


@dataclass(frozen=True)
class ReplicaStats:
    captured_buckets: tuple[int, ...]   # decode batch sizes with a CUDA graph (all buckets on CPU: eager)
    max_seq_len: int                    # longest sequence one request may reach
    max_num_seqs: int                   # sequences the engine runs at once
    running: int                        # sequences admitted (holding KV blocks) now
    free_slots: int                     # further sequences it would admit now
    queued: int                         # requests waiting for admission
    graphs: bool                        # True when decode runs by graph replay (CUDA), False on CPU
    fallback: str = "eager"             # "eager" | "queue": what happens past the largest bucket
    timestamp: float = field(default_factory=time.time)  # wall clock when the replica produced it
    # -- capacity and cost (version 2) --
    block_size: int = 0                 # tokens per KV block (0: unknown)
    total_blocks: int = 0               # KV blocks in the pool
    free_blocks: int = 0                # blocks allocatable now (free + evictable cached)
    prefill_backlog_tokens: int = 0     # prompt tokens admitted or queued, not yet prefilled
    decode_rows: int = 0                # sequences past prefill, decoding
    prefill_tokens_per_s: float = 0.0   # measured prefill rate (median of recent steps; 0: not measured)
    decode_step_s: Mapping[int, float] = field(default_factory=dict)  # bucket -> step seconds (median)
    mean_output_tokens: float = 0.0     # finished sequences' output tokens (moving average; 0: none yet)
    min_remaining_steps: int = 0        # decode steps until its first running sequence ends (0: none)
    prefix_hashes: tuple[int, ...] = () # cached prefix hashes at summary depths (bounded)
    # The GPU(s) it runs on, "<node id>:<gpu ids>" ("": unknown or CPU). Replicas publishing the
    # same value time-share one device (num_gpus < 1), and the estimate charges each the others' work.
    device: str = ""
    # Wall clock when `prefix_hashes` was built (0: unknown). The summary is rebuilt less often
    # than stats are taken, so it can be older than `timestamp`: blocks a request left after this
    # moment are not in it yet (the router keeps its own record of them until it passes).
    prefix_summary_time: float = 0.0

    @cached_property
    def prefix_set(self) -> frozenset[int]:
        """`prefix_hashes` as a set, built once per stats object (the router keeps one parsed
        object per published dict, so lookups stay O(1) per hint hash)."""
        return frozenset(self.prefix_hashes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["captured_buckets"] = list(self.captured_buckets)
        d["decode_step_s"] = {int(k): float(v) for k, v in self.decode_step_s.items()}
        d["prefix_hashes"] = list(self.prefix_hashes[:MAX_PREFIX_HASHES])
        return d

    def idle_like(self, timestamp: float) -> "ReplicaStats":
        """What an idle replica of the same deployment would publish at `timestamp`: these
        stats' shape (buckets, limits, KV pool) with nothing running, queued or cached, and no
        rates of its own (the estimate then uses the fleet's, `estimate.fleet_prior`). The router
        ranks a replica that has not published yet this way (router/request_router.py)."""
        return replace(self, running=0, free_slots=self.max_num_seqs, queued=0,
                       free_blocks=self.total_blocks, prefill_backlog_tokens=0, decode_rows=0,
                       prefill_tokens_per_s=0.0, decode_step_s={}, min_remaining_steps=0,
                       prefix_hashes=(), device="", timestamp=timestamp, prefix_summary_time=0.0)

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
                block_size=int(d.get("block_size", 0)),
                total_blocks=int(d.get("total_blocks", 0)),
                free_blocks=int(d.get("free_blocks", 0)),
                prefill_backlog_tokens=int(d.get("prefill_backlog_tokens", 0)),
                decode_rows=int(d.get("decode_rows", 0)),
                prefill_tokens_per_s=float(d.get("prefill_tokens_per_s", 0.0)),
                decode_step_s={int(k): float(v) for k, v in dict(d.get("decode_step_s") or {}).items()},
                mean_output_tokens=float(d.get("mean_output_tokens", 0.0)),
                min_remaining_steps=int(d.get("min_remaining_steps", 0)),
                prefix_hashes=tuple(int(h) for h in list(d.get("prefix_hashes") or ())[:MAX_PREFIX_HASHES]),
                device=str(d.get("device") or "")[:MAX_DEVICE_CHARS],
                prefix_summary_time=float(d.get("prefix_summary_time") or 0.0),
            )
        except (KeyError, TypeError, ValueError):
            return None
