"""graphserve's Grafana dashboard, built in code: one generator, JSON out.

Usage: python -m deployments.dashboard [-o FILE] [--markdown | --ascii | --metrics]

Contract:
- Our metric names come only from `router/metrics.py` (`spec.exported_name`, plus `_bucket` for
  histograms); Ray Serve's built-in series are the `SERVE_*` constants below (Ray 2.60 names, checked
  against a live app by tests/integration/test_prometheus.py). Every catalog metric has a panel.
- Queries filter on `ray_io_cluster=~"$cluster"` (the label KubeRay's PodMonitors add; it holds the
  RayCluster name, which changes on every upgrade, hence a regex) and `application=~"$application"`.
  Series without the label (a local Prometheus) match the "All" value `.*`.
- The datasource is the `${datasource}` variable, never a hard-coded UID, so the same JSON works
  pushed by `deployments.grafana_push` or provisioned from the ConfigMap k8s/generate.py writes.
- `build_dashboard()` is deterministic: the committed ConfigMap is compared with it by a test.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from typing import Optional

from router import metrics as m

UID = "graphserve"
TITLE = "graphserve: decode, CUDA graphs, routing"
FILTER = 'ray_io_cluster=~"$cluster",application=~"$application"'
CLUSTER_FILTER = 'ray_io_cluster=~"$cluster"'
GRAPH_PATH_FILTER = 'path="graph",' + FILTER
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.9, 0.99)

# Ray Serve built-ins read by this dashboard (Ray's names, not ours; see ray-serve-2.60.md section 6).
SERVE_HTTP_REQUESTS = "ray_serve_num_http_requests_total"            # route, method, application, status_code
SERVE_HTTP_LATENCY = "ray_serve_http_request_latency_ms"              # histogram, proxy end to end
SERVE_ONGOING_HTTP = "ray_serve_num_ongoing_http_requests"            # per proxy; no application label
SERVE_REPLICA_HEALTHY = "ray_serve_deployment_replica_healthy"
SERVE_REPLICA_STARTS = "ray_serve_deployment_replica_starts_total"    # a counter: never goes stale
SERVE_QUEUED = "ray_serve_deployment_queued_queries"                  # at the handle, waiting for a replica
SERVE_PROCESSING = "ray_serve_replica_processing_queries"             # running inside replicas
SERVE_ROUTER_WAIT = "ray_serve_request_router_fulfillment_time_ms"    # histogram, router queue time
SERVE_REPLICA_LATENCY = "ray_serve_deployment_processing_latency_ms"  # histogram, inside the replica
SERVE_BUILTINS = (SERVE_HTTP_REQUESTS, SERVE_HTTP_LATENCY, SERVE_ONGOING_HTTP, SERVE_REPLICA_HEALTHY,
                  SERVE_REPLICA_STARTS, SERVE_QUEUED, SERVE_PROCESSING, SERVE_ROUTER_WAIT,
                  SERVE_REPLICA_LATENCY)


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12


def rate(series: str, by: str = "", flt: str = FILTER) -> str:
    """sum [by (labels)] (rate(series{filter}[$__rate_interval]))"""
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({series}{{{flt}}}[{RATE}]))"


def gauge(series: str, by: str, agg: str = "sum", flt: str = FILTER) -> str:
    return f"{agg} by ({by}) ({series}{{{flt}}})"


def share(series: str, label: str) -> str:
    """Each value of `label` as a fraction of the total rate."""
    return f"{rate(series, label)} / ignoring({label}) group_left {rate(series)}"


def quantiles(hist: str, by: str = "", legend: str = "") -> tuple[Target, ...]:
    """p50/p90/p99 of a histogram given by its base name (the `_bucket` series is queried)."""
    labels = ", ".join(x for x in ("le", by) if x)
    return tuple(Target(f"histogram_quantile({q}, {rate(hist + '_bucket', labels)})",
                        f"p{round(q * 100)}{legend}") for q in QUANTILES)


def _t(expr: str, legend: str) -> tuple[Target, ...]:
    return (Target(expr, legend),)


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Serve: traffic and latency", (
        Panel("HTTP requests/s by status", "Requests through Serve's HTTP proxies.",
              _t(rate(SERVE_HTTP_REQUESTS, "status_code"), "{{status_code}}"), "reqps", width=8),
        Panel("HTTP latency (proxy, end to end)", "Quantiles of Serve's proxy latency histogram.",
              quantiles(SERVE_HTTP_LATENCY), "ms", width=8),
        Panel("Ongoing HTTP requests per proxy", "Serve labels this gauge by node, not application.",
              _t(gauge(SERVE_ONGOING_HTTP, "node_ip_address", flt=CLUSTER_FILTER), "{{node_ip_address}}"),
              width=8),
    )),
    ("Serve: queues and replicas", (
        Panel("Queued at the handle", "Requests waiting in a handle/router for a replica to accept them.",
              _t(gauge(SERVE_QUEUED, "deployment"), "{{deployment}}"), width=6),
        Panel("Running in replicas", "Requests being processed inside replicas.",
              _t(gauge(SERVE_PROCESSING, "deployment"), "{{deployment}}"), width=6),
        Panel("Router queue wait", "Time a request waits in the router before a replica takes it.",
              quantiles(SERVE_ROUTER_WAIT, "deployment", " {{deployment}}"), "ms", width=6),
        Panel("Healthy replicas", "Replicas passing health checks, by deployment.",
              _t(gauge(SERVE_REPLICA_HEALTHY, "deployment"), "{{deployment}}"), width=6),
    )),
    ("Decode", (
        Panel("Decode steps/s by bucket and path", "Pure-decode steps. path=graph: CUDA graph replay; "
              "eager: a batch larger than every captured bucket (bucket = its row count).",
              _t(rate(m.DECODE_STEPS.exported_name, "bucket, path"), "bucket {{bucket}} {{path}}")),
        Panel("Graph-hit (pure decode) and mixed-step share", "graph: replays over pure-decode steps "
              "(0 on CPU, where decode is eager); mixed: steps that ran prefill chunks, over all steps; "
              "mixed graphed: mixed steps that replayed piecewise graphs, over mixed steps.",
              (Target(f"({rate(m.DECODE_STEPS.exported_name, flt=GRAPH_PATH_FILTER)} or vector(0)) / "
                      f"{rate(m.DECODE_STEPS.exported_name)}", "graph-hit"),
               Target(f"{rate(m.MIXED_STEPS.exported_name)} / ({rate(m.MIXED_STEPS.exported_name)} + "
                      f"{rate(m.DECODE_STEPS.exported_name)})", "mixed share"),
               Target(f"({rate(m.MIXED_GRAPH_STEPS.exported_name)} or vector(0)) / "
                      f"{rate(m.MIXED_STEPS.exported_name)}", "mixed graphed")), "percentunit"),
        Panel("Padded rows per step, by bucket", "Rows replayed without a sequence, per decode step.",
              _t(f"{rate(m.PADDED_ROWS.exported_name, 'bucket')} / "
                 f"{rate(m.DECODE_STEPS.exported_name, 'bucket')}", "bucket {{bucket}}")),
        Panel("Tokens/s", "Generated (decode), prompt (admitted) and prefilled tokens.",
              (Target(rate(m.GENERATED_TOKENS.exported_name, "model"), "generated {{model}}"),
               Target(rate(m.PROMPT_TOKENS.exported_name, "model"), "prompt {{model}}"),
               Target(rate(m.PREFILL_TOKENS.exported_name, "model"), "prefilled {{model}}"))),
        Panel("Tokens per step", "Prefill tokens per mixed step, and decode rows per step (pure "
              "decode and mixed steps together).",
              (Target(f"{rate(m.PREFILL_TOKENS.exported_name)} / {rate(m.MIXED_STEPS.exported_name)}",
                      "prefill / mixed step"),
               Target(f"{rate(m.GENERATED_TOKENS.exported_name)} / ({rate(m.DECODE_STEPS.exported_name)} + "
                      f"{rate(m.MIXED_STEPS.exported_name)})", "decode rows / step"),
               Target(f"{rate(m.MIXED_DECODE_ROWS.exported_name)} / {rate(m.MIXED_STEPS.exported_name)}",
                      "decode rows / mixed step"))),
    )),
    ("KV cache and prefix cache", (
        Panel("KV blocks in use", "Fraction of each replica's KV blocks held by sequences.",
              _t(gauge(m.KV_BLOCKS_USED.exported_name, "replica", "max"), "{{replica}}"), "percentunit",
              width=6),
        Panel("Prefix cache hit rate", "Prompt tokens served from cached blocks over prompt tokens "
              "looked up.", _t(f"({rate(m.PREFIX_HITS.exported_name)} or vector(0)) / "
                               f"{rate(m.PREFIX_QUERIED.exported_name)}", "hit rate"), "percentunit", width=6),
        Panel("Preemptions/s", "Sequences whose blocks were freed for recompute when the pool ran "
              "out (0 until the first: Ray creates a counter at its first increment).",
              _t(f"{rate(m.PREEMPTIONS.exported_name, 'replica')} or vector(0)", "{{replica}}"), "ops",
              width=6),
        Panel("Prefill backlog", "Prompt tokens waiting to be prefilled, per replica.",
              _t(gauge(m.PREFILL_BACKLOG.exported_name, "replica"), "{{replica}}"), width=6),
    )),
    ("Latency per token", (
        Panel("Time to first token", "From a request's arrival at the engine to its first token.",
              quantiles(m.TTFT.exported_name), "s", width=8),
        Panel("Time per output token", "Between consecutive output tokens of one request.",
              quantiles(m.TPOT.exported_name), "s", width=8),
        Panel("Replica processing latency", "Serve's histogram of a call's time inside the replica.",
              quantiles(SERVE_REPLICA_LATENCY, "deployment", " {{deployment}}"), "ms", width=8),
    )),
    ("Admission and CUDA graphs", (
        Panel("Running sequences and free rows", "Per replica.",
              (Target(gauge(m.RUNNING_SEQS.exported_name, "replica"), "running {{replica}}"),
               Target(gauge(m.FREE_KV_SLOTS.exported_name, "replica"), "free {{replica}}")), width=6),
        Panel("Waiting for admission", "Requests queued inside each engine.",
              _t(gauge(m.QUEUED_REQUESTS.exported_name, "replica"), "{{replica}}"), width=6),
        Panel("Graph capture time per replica", "Seconds spent capturing CUDA graphs at startup.",
              _t(gauge(m.CAPTURE_SECONDS.exported_name, "replica", "max"), "{{replica}}"), "s",
              "bargauge", width=6),
        Panel("CUDA graph memory per replica", "GPU memory held by captured graphs.",
              _t(gauge(m.GRAPH_BYTES.exported_name, "replica", "max"), "{{replica}}"), "bytes",
              "bargauge", width=6),
    )),
    ("Router", (
        Panel("Routing decisions/s by outcome", "graph_fit: the first choice runs inside a captured "
              "graph; no_fit; no_stats: no fresh replica stats.",
              _t(rate(m.ROUTER_DECISIONS.exported_name, "outcome"), "{{outcome}}"), "ops"),
        Panel("Routing outcome share", "Fraction of decisions per outcome.",
              _t(share(m.ROUTER_DECISIONS.exported_name, "outcome"), "{{outcome}}"), "percentunit"),
    )),
)

PANEL_HEIGHT = 8
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    out = {
        "id": pid, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": PANEL_HEIGHT, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr,
                     "legendFormat": t.legend, "range": True} for i, t in enumerate(panel.targets)],
    }
    if panel.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "orientation": "horizontal", "displayMode": "gradient"}
    return out


def _query_var(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "includeAll": True, "allValue": ".*", "multi": True, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def variables() -> list[dict]:
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1},
        _query_var("cluster", "Ray cluster", f"label_values({SERVE_REPLICA_STARTS}, ray_io_cluster)"),
        _query_var("application", "Application",
                   f"label_values({SERVE_REPLICA_STARTS}{{{CLUSTER_FILTER}}}, application)"),
    ]


def build_dashboard() -> dict:
    """The dashboard JSON (a dict), rows laid out top to bottom on Grafana's 24-column grid."""
    panels: list[dict] = []
    pid, y = 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y = 0, y + PANEL_HEIGHT
            panels.append(_panel_json(panel, pid, x, y))
            pid, x = pid + 1, x + panel.width
        y += PANEL_HEIGHT
    return {
        "uid": UID, "title": TITLE, "tags": ["graphserve", "ray", "serve"], "timezone": "browser",
        "editable": True, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "graphTooltip": 1,
        "templating": {"list": variables()}, "annotations": {"list": []}, "links": [], "panels": panels,
    }


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target, in panel order."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def instantiate(expr: str, cluster: str = ".*", application: str = ".*", rate_interval: str = "1m") -> str:
    """`expr` as Grafana sends it to Prometheus, with the dashboard's variables substituted."""
    for var, value in (("$__rate_interval", rate_interval), ("$cluster", cluster),
                       ("$application", application)):
        expr = expr.replace(var, value)
    return expr


def to_json(dashboard: Optional[dict] = None) -> str:
    return json.dumps(dashboard or build_dashboard(), indent=2, sort_keys=True) + "\n"


def markdown_table(dashboard: Optional[dict] = None) -> str:
    """A table of rows and panels (position on the 24-column grid, unit, metrics queried)."""
    dashboard = dashboard or build_dashboard()
    lines = ["| Row | Panel | Grid x,y w×h | Unit | Series |", "|---|---|---|---|---|"]
    row = ""
    for p in dashboard["panels"]:
        if p["type"] == "row":
            row = p["title"]
            continue
        g = p["gridPos"]
        series = sorted({name for t in p["targets"] for name in series_names(t["expr"])})
        lines.append(f"| {row} | {p['title']} | {g['x']},{g['y']} {g['w']}×{g['h']} | "
                     f"{p['fieldConfig']['defaults']['unit']} | {', '.join(f'`{s}`' for s in series)} |")
    return "\n".join(lines) + "\n"


def metrics_table() -> str:
    """A table of graphserve's own metrics, straight from router/metrics.py."""
    lines = ["| Series (Prometheus) | Kind | Labels (plus application, deployment, replica) | Meaning |",
             "|---|---|---|---|"]
    for spec in m.CATALOG:
        suffix = "_bucket/_sum/_count" if spec.kind == "histogram" else ""
        lines.append(f"| `{spec.exported_name}`{suffix} | {spec.kind} | {', '.join(spec.tag_keys)} | "
                     f"{spec.description} |")
    return "\n".join(lines) + "\n"


def series_names(expr: str) -> list[str]:
    """The metric names a PromQL expression selects (identifiers followed by a `{` selector)."""
    return sorted(set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr)))


def ascii_layout(dashboard: Optional[dict] = None, col: int = 4) -> str:
    """A text drawing of the grid: each of Grafana's 24 columns is `col` characters wide."""
    dashboard = dashboard or build_dashboard()
    out: list[str] = []
    line: list[dict] = []
    for p in dashboard["panels"] + [{"type": "row", "title": None}]:
        if line and (p["type"] == "row" or p["gridPos"]["y"] != line[0]["gridPos"]["y"]):
            out += _ascii_boxes(line, col)
            line = []
        if p["type"] == "row" and p["title"]:
            out.append(f"== {p['title']} ".ljust(24 * col, "="))
        elif p["type"] != "row":
            line.append(p)
    return "\n".join(out) + "\n"


def _ascii_boxes(line: list[dict], col: int) -> list[str]:
    widths = [p["gridPos"]["w"] * col for p in line]
    border = "+" + "+".join("-" * (w - 1) for w in widths) + "+"
    cells = [_wrap(p["title"], w - 3) for p, w in zip(line, widths)]
    height = max(len(c) for c in cells)
    rows = ["|" + "|".join(f" {(c[i] if i < len(c) else ''):<{w - 2}}" for c, w in zip(cells, widths)) + "|"
            for i in range(height)]
    return [border, *rows, border]


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + [cur]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.dashboard", description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", help="write here instead of stdout")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="a markdown table of the panels")
    fmt.add_argument("--ascii", action="store_true", help="a text drawing of the panel layout")
    fmt.add_argument("--metrics", action="store_true", help="a markdown table of graphserve's metrics")
    args = ap.parse_args(argv)
    text = (markdown_table() if args.markdown else ascii_layout() if args.ascii
            else metrics_table() if args.metrics else to_json())
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
