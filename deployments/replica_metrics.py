"""`ReplicaMetrics`: exports one replica's engine counters as Ray metrics (names from router/metrics.py).

- counters (decode steps by bucket/path, mixed steps, padded rows by bucket, prompt, prefill and
  generated tokens, preemptions, prefix-cache lookups and hits) are exported as deltas between two
  `EngineStats` snapshots: `update(stats)` runs periodically from a background task of the
  replica, so the engine's step loop never touches a metric;
- gauges (running sequences, free rows, queued requests, KV blocks in use, prefill backlog) are
  set by the same `update`;
- capture seconds and graph bytes come from the startup report; like every gauge they are set
  again at each `update`, because Ray stops exporting a gauge value that is not refreshed;
- TTFT and TPOT histograms are observed by the replica from its chunk timing.

Ray adds the application/deployment/replica tags; the `model` tag is set here. `make` is injected so
unit tests count calls on fakes instead of starting Ray.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from router import metrics as catalog


# Counters exported as deltas of an EngineStats total: (spec, EngineStats attribute)
TOTALS = ((catalog.GENERATED_TOKENS, "generated_tokens"), (catalog.PROMPT_TOKENS, "prompt_tokens"),
          (catalog.PREFILL_TOKENS, "prefill_tokens"), (catalog.MIXED_STEPS, "mixed_steps"),
          (catalog.MIXED_GRAPH_STEPS, "mixed_graph_steps"),
          (catalog.MIXED_DECODE_ROWS, "mixed_decode_rows"), (catalog.PREEMPTIONS, "preemptions"),
          (catalog.PREFIX_QUERIED, "prefix_queried_tokens"), (catalog.PREFIX_HITS, "prefix_hit_tokens"))


class ReplicaMetrics:
    def __init__(self, model: str, make: Callable[[catalog.MetricSpec], Any] = catalog.make_ray_metric):
        self._m = {spec.name: make(spec) for spec in (
            catalog.DECODE_STEPS, catalog.PADDED_ROWS, *(spec for spec, _ in TOTALS),
            catalog.RUNNING_SEQS, catalog.FREE_KV_SLOTS, catalog.QUEUED_REQUESTS, catalog.KV_BLOCKS_USED,
            catalog.PREFILL_BACKLOG, catalog.TTFT, catalog.TPOT, catalog.CAPTURE_SECONDS, catalog.GRAPH_BYTES)}
        for metric in self._m.values():
            metric.set_default_tags({"model": model})
        self._last: Optional[Any] = None   # the EngineStats of the previous update

    def update(self, stats: Any) -> None:
        """Export what changed since the previous snapshot (the first call exports everything)."""
        prev = self._last
        steps = self._m[catalog.DECODE_STEPS.name]
        for (bucket, path), count in stats.decode_steps.items():
            delta = count - (prev.decode_steps.get((bucket, path), 0) if prev else 0)
            if delta > 0:
                steps.inc(delta, tags={"bucket": str(bucket), "path": path})
        padded = self._m[catalog.PADDED_ROWS.name]
        for bucket, rows in stats.padded_rows.items():
            delta = rows - (prev.padded_rows.get(bucket, 0) if prev else 0)
            if delta > 0:
                padded.inc(delta, tags={"bucket": str(bucket)})
        for spec, attr in TOTALS:
            now, before = getattr(stats, attr), getattr(prev, attr) if prev else 0
            if now > before:
                self._m[spec.name].inc(now - before)
        self._m[catalog.RUNNING_SEQS.name].set(stats.running)
        self._m[catalog.FREE_KV_SLOTS.name].set(stats.free_slots)
        self._m[catalog.QUEUED_REQUESTS.name].set(stats.queued)
        self._m[catalog.KV_BLOCKS_USED.name].set(float(stats.kv_usage()))
        self._m[catalog.PREFILL_BACKLOG.name].set(stats.prefill_backlog_tokens)
        self._m[catalog.CAPTURE_SECONDS.name].set(float(stats.startup.capture_seconds))
        self._m[catalog.GRAPH_BYTES.name].set(float(stats.startup.graph_bytes))
        self._last = stats

    def observe_ttft(self, seconds: float) -> None:
        self._m[catalog.TTFT.name].observe(seconds)

    def observe_tpot(self, seconds: float) -> None:
        self._m[catalog.TPOT.name].observe(seconds)
