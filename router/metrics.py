"""The one catalog of graphserve's metric names, kinds, labels and buckets.

The replica deployment, the router and the Grafana dashboard generator all read their names from
here, so a dashboard query cannot drift from what the code exports. It lives in `router/` because
that is the dependency-free package every process already imports (the router is pickled into each
caller); it imports neither torch nor Ray at module load.

Ray exports a user metric `x` as `ray_x`, and a counter as `ray_x_total` (see `exported_name`).
Ray adds the labels `application`, `deployment` and `replica` inside a Serve replica.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str                      # "counter" | "gauge" | "histogram"
    description: str
    tag_keys: tuple[str, ...] = ("model",)
    boundaries: Optional[tuple[float, ...]] = None

    @property
    def exported_name(self) -> str:
        """The Prometheus series name Ray gives this metric (histograms add _bucket/_sum/_count)."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"


DECODE_STEPS = MetricSpec("graphserve_decode_steps", "counter",
                          "Pure-decode steps run, by batch bucket and path (graph replay or eager).",
                          ("model", "bucket", "path"))
MIXED_STEPS = MetricSpec("graphserve_mixed_steps", "counter",
                         "Steps that ran prefill chunks (with any decode rows) in one forward.")
MIXED_GRAPH_STEPS = MetricSpec("graphserve_mixed_graph_steps", "counter",
                               "Mixed steps that replayed piecewise CUDA graphs (small steps; the "
                               "rest of the mixed steps ran eagerly).")
PREFILL_TOKENS = MetricSpec("graphserve_prefill_tokens", "counter",
                            "Tokens run in prefill chunks (prompts not served by the prefix cache, "
                            "and recomputes after preemption).")
MIXED_DECODE_ROWS = MetricSpec("graphserve_mixed_decode_rows", "counter",
                               "Decode rows that rode along inside mixed steps.")
PADDED_ROWS = MetricSpec("graphserve_padded_rows", "counter",
                         "Padding rows replayed to fill a bucket (rows that carry no sequence).",
                         ("model", "bucket"))
TTFT = MetricSpec("graphserve_time_to_first_token_seconds", "histogram",
                  "Time from a request's arrival at the engine to its first token.",
                  ("model",), LATENCY_BUCKETS_S)
TPOT = MetricSpec("graphserve_time_per_output_token_seconds", "histogram",
                  "Time between consecutive output tokens of one request.",
                  ("model",), LATENCY_BUCKETS_S)
GENERATED_TOKENS = MetricSpec("graphserve_generated_tokens", "counter", "Output tokens generated.")
PROMPT_TOKENS = MetricSpec("graphserve_prompt_tokens", "counter", "Prompt tokens of admitted requests.")
RUNNING_SEQS = MetricSpec("graphserve_running_sequences", "gauge", "Sequences admitted (holding KV blocks).")
FREE_KV_SLOTS = MetricSpec("graphserve_free_kv_slots", "gauge",
                           "Further sequences the engine would admit now (free decode rows).")
QUEUED_REQUESTS = MetricSpec("graphserve_queued_requests", "gauge", "Requests waiting for admission.")
KV_BLOCKS_USED = MetricSpec("graphserve_kv_blocks_used_ratio", "gauge",
                            "Fraction of KV blocks held by sequences (cached idle blocks count as free).")
PREFILL_BACKLOG = MetricSpec("graphserve_prefill_backlog_tokens", "gauge",
                             "Prompt tokens admitted or queued that are not prefilled yet.")
PREEMPTIONS = MetricSpec("graphserve_preemptions", "counter",
                         "Sequences preempted (KV blocks freed, recomputed later) when blocks ran out.")
PREFIX_QUERIED = MetricSpec("graphserve_prefix_cache_queried_tokens", "counter",
                            "Prompt tokens looked up in the prefix cache at admission.")
PREFIX_HITS = MetricSpec("graphserve_prefix_cache_hit_tokens", "counter",
                         "Prompt tokens served from cached KV blocks (their prefill skipped).")
CAPTURE_SECONDS = MetricSpec("graphserve_graph_capture_seconds", "gauge",
                             "Seconds this replica spent capturing its CUDA graphs at startup.")
GRAPH_BYTES = MetricSpec("graphserve_graph_bytes", "gauge",
                         "GPU memory held by this replica's captured CUDA graphs.")
ROUTER_DECISIONS = MetricSpec("graphserve_router_decisions", "counter",
                              "Routing decisions by outcome: graph_fit (first choice runs inside a "
                              "captured graph), no_fit, no_stats (no fresh replica stats) or no_hint "
                              "(the caller sent no request shape).",
                              ("outcome",))

CATALOG: tuple[MetricSpec, ...] = (DECODE_STEPS, MIXED_STEPS, MIXED_GRAPH_STEPS, PADDED_ROWS, TTFT, TPOT, GENERATED_TOKENS,
                                   PROMPT_TOKENS, PREFILL_TOKENS, MIXED_DECODE_ROWS, RUNNING_SEQS,
                                   FREE_KV_SLOTS, QUEUED_REQUESTS, KV_BLOCKS_USED, PREFILL_BACKLOG,
                                   PREEMPTIONS, PREFIX_QUERIED, PREFIX_HITS, CAPTURE_SECONDS, GRAPH_BYTES,
                                   ROUTER_DECISIONS)


def make_ray_metric(spec: MetricSpec) -> Any:
    """Create the `ray.serve.metrics` object for a spec (imports Ray lazily)."""
    from ray.serve import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
    return metrics.Histogram(spec.name, description=spec.description,
                             boundaries=list(spec.boundaries or LATENCY_BUCKETS_S), tag_keys=spec.tag_keys)
