"""serve_load's numbers: replica-counter deltas, per-phase metrics, the issue's bars, the table.

Pure functions over the dicts serve_load.py collects (replica `counters()` snapshots, per-sequence
records from benchmarks/common.py) and writes to its JSON; no Ray, no torch.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402


def replica_delta(before: list[dict], after: list[dict]) -> dict:
    """Decode steps by (bucket, path), padding and batch sizes per replica, run between snapshots."""
    prev = {r["replica"]: r for r in before}
    steps_all, padded, out = {}, 0, []
    have_padded = all("padded_rows" in r for r in after)
    for r in after:
        p = prev.get(r["replica"], {})
        d = C.diff_steps(_steps(r), _steps(p))
        for k, n in d.items():
            steps_all[k] = steps_all.get(k, 0) + n
        if have_padded:
            padded += sum(int(v) for v in r["padded_rows"].values()) - \
                sum(int(v) for v in p.get("padded_rows", {}).values())
        sizes = {int(k): v - p.get("batch_sizes", {}).get(k, 0) for k, v in r.get("batch_sizes", {}).items()}
        out.append({"replica": r["replica"], "rank": r.get("rank"), "buckets": r.get("captured_buckets"),
                    "decode_steps": d, "batch_sizes": {k: v for k, v in sorted(sizes.items()) if v}})
    rows_run = sum(int(k.split(":")[0]) * n for k, n in steps_all.items() if not k.startswith("0:"))
    return {"per_replica": out, "decode_steps": steps_all, "graph_hit": C.graph_hit_rate(steps_all),
            "rows_run_bucketed": rows_run, "padded_rows": padded if have_padded else None}


def _steps(counters: dict) -> dict:
    return {(int(b), str(path)): int(n) for b, path, n in counters.get("decode_steps", [])}


def load_metrics(seqs, t0, t1, delta) -> dict:
    ok = [s for s in seqs if s["t_last"] is not None]
    end = max((s["t_last"] for s in ok), default=t1)
    m = {"all": C.seq_metrics(seqs), "interactive": C.seq_metrics([s for s in seqs if s["kind"] == "interactive"]),
         "batch": C.seq_metrics([s for s in seqs if s["kind"] == "batch"]), "wall_s": end - t0}
    m["tokens_per_s"] = m["all"]["tokens"] / m["wall_s"] if m["wall_s"] > 0 else None
    m["graph_hit"] = delta["graph_hit"]
    padded, live = delta["padded_rows"], m["all"]["tokens"] - (m["all"]["sequences"] - m["all"]["errors"])
    if padded is None and not any(k.startswith("0:") for k in delta["decode_steps"]):
        padded, m["padding_note"] = delta["rows_run_bucketed"] - live, "derived: bucket rows - decode tokens"
    if padded is not None and live + padded > 0:  # live decode rows = tokens - first tokens (prefill)
        m["padding_waste"] = padded / (live + padded)
    return m


def graph_hit_all(r: dict) -> float | None:
    """Graph-hit rate over the mix and the bursts together (decode steps summed per key)."""
    steps: dict = {}
    for phase in _phases(r):
        for k, n in ((r.get(phase) or {}).get("replicas") or {}).get("decode_steps", {}).items():
            steps[k] = steps.get(k, 0) + n
    return C.graph_hit_rate(steps)


def _phases(r: dict) -> list[str]:
    return [k for k in r if k == "load" or k.startswith("burst")]


def bursts_tokens_per_s(r: dict) -> float | None:
    """All bursts together: output tokens / summed wall time (each burst starts from idle)."""
    runs = [r[k] for k in _phases(r) if k.startswith("burst") and r[k].get("wall_s")]
    wall = sum(m["wall_s"] for m in runs)
    return sum(m["all"]["tokens"] for m in runs) / wall if wall else None


def bars(res) -> dict:
    ours, dflt, out = res["routers"].get("ours", {}), res["routers"].get("default", {}), {}
    if ours.get("load"):
        out["graph_hit_ours>=0.99"] = C.ge(graph_hit_all(ours), 0.99)
    rates = {"burst": (bursts_tokens_per_s(ours), bursts_tokens_per_s(dflt)),  # capacity
             "load": ((ours.get("load") or {}).get("tokens_per_s"),           # open loop: mostly the
                      (dflt.get("load") or {}).get("tokens_per_s"))}          # offered rate
    for phase, (x, y) in rates.items():
        if x and y:
            res[f"{phase}_tokens_per_s_ours_over_default"] = x / y
            out[f"tokens_per_s_ours>=default({phase})"] = x >= y
    eng = (res.get("engine_probe") or {}).get("ms_per_step")
    http = (ours.get("probe") or {}).get("per_token_ms")
    if eng and http:
        res["probe_ratio_http_over_engine"] = http / eng
        out["http_b1_per_token_within_15%_of_engine_step"] = http <= 1.15 * eng
    return out


def print_summary(res):
    eng = (res.get("engine_probe") or {}).get("ms_per_step")
    print(f"\ncard {res['env']['card']} x{res.get('gpus')}, model {res['args']['model']}, torch {res['env']['torch']}")
    keys, lines = ("tok_s", "ttft50", "ttft99", "tpot50", "tpot99", "hit", "pad"), []
    for phase in _phases(next(iter(res["routers"].values()), {})):
        by = {}
        for name, r in res["routers"].items():
            m = r.get(phase) or {}
            al = m.get("all", {})
            by[name] = dict(zip(keys, (m.get("tokens_per_s"), al.get("ttft_ms_p50"), al.get("ttft_ms_p99"),
                                       al.get("tpot_ms_p50"), al.get("tpot_ms_p99"), m.get("graph_hit"),
                                       m.get("padding_waste"))), row=f"{phase}:{name}")
            lines.append(by[name])
        if "ours" in by and "default" in by:
            o, d = by["ours"], by["default"]
            lines.append({"row": f"{phase}:ours/dflt", **{k: o[k] / d[k] for k in keys if o[k] and d[k]}})
    C.print_table(lines, [("row", "phase:router", 17)] + [(k, k, 8) for k in keys])
    for name, r in res["routers"].items():
        pr = r.get("probe") or {}
        http = pr.get("per_token_ms")
        print(f"b1 probe {name}: HTTP per-token {C.fmt(http)} ms / engine step {C.fmt(eng)} ms = "
              f"{C.fmt(http / eng if http and eng else None)}; steps {pr.get('decode_steps')}")
    print("(ms; hit = graph-replayed decode steps / all; pad = padded rows / rows run; burst tok/s = capacity)")
    print("bars:", res["bars"])
