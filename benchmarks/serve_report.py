"""serve_load's numbers: replica-counter deltas, per-phase metrics, pooled comparisons, bars, table.

Pure functions over the dicts serve_load.py collects (replica `counters()` snapshots, the client
records of benchmarks/serve_clients.py) and writes to its JSON; no Ray, no torch.

Per phase: tokens/s = output tokens the replicas generated (their counters) / (phase start .. last
token, or the stop time when the phase was cut: counters read at the stop); TTFT per sequence (a chat turn is a sequence) = first token - send, and for a
sequence cut before its first token the cut time - send (a lower bound, counted as `censored`);
TPOT = (last - first token) / (tokens - 1). Groups: `all`, `interactive` (HTTP requests and chat
turns: what a person waits on), `batch`, `chat`, `chat_followup` (turns >= 2). From the replicas'
counters: graph-hit = decode steps replayed / all decode steps; padding waste = padded rows /
rows run in bucketed decode steps; prefix hit rate = prompt tokens served from the prefix cache /
prompt tokens looked up at admission; per replica the sequences it received; `replica_ttft_ms_*`
and `replica_tpot_ms_*`, the replicas' own TTFT/TPOT histograms (from a request reaching the replica
to its first token there; deployments/latency_histogram.py), whose gap to the client's TTFT is the
path in front of the engine.
Pooled (`summarize`): per trace and phase kind (burst, lo, hi, and open = lo + hi), the phases
both routers ran, over all seeds: tokens / wall summed, percentiles over every sequence.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from deployments import latency_histogram as LH  # noqa: E402 - pure Python, no Ray

GROUPS = {"all": None, "interactive": ("interactive", "chat"), "batch": ("batch",), "chat": ("chat",)}
KINDS = ("burst", "lo", "hi")
# sample kinds (phase_metrics' `samples`) per pooled group
EVERY = ("interactive", "batch", "chat", "chat_followup")
PERSON = ("interactive", "chat", "chat_followup")    # what a person waits on
CHAT = ("chat", "chat_followup")


# ---------------------------------------------------------------- replica counters

def replica_delta(before: list[dict], after: list[dict]) -> dict:
    """What the replicas did between two `counters()` snapshots, per replica and in total."""
    prev = {r["replica"]: r for r in before}
    steps_all: dict[str, int] = {}
    per, tot = [], {"padded_rows": 0, "prefix_hit_tokens": 0, "prefix_queried_tokens": 0, "generated_tokens": 0}
    for r in sorted(after, key=lambda r: r.get("rank", 0)):
        p = prev.get(r["replica"], {})
        d = C.diff_steps(_steps(r), _steps(p))
        for k, n in d.items():
            steps_all[k] = steps_all.get(k, 0) + n
        sizes = {int(k): v - p.get("batch_sizes", {}).get(k, 0) for k, v in r.get("batch_sizes", {}).items()}
        row = {"replica": r["replica"], "rank": r.get("rank"), "buckets": _span(r.get("captured_buckets")),
               "total_blocks": r.get("total_blocks"), "decode_steps": d,
               "batch_sizes": {k: v for k, v in sorted(sizes.items()) if v},
               "sequences": sum(k * v for k, v in sizes.items())}
        row["padded_rows"] = _sum(r.get("padded_rows")) - _sum(p.get("padded_rows"))
        for k in ("prefix_hit_tokens", "prefix_queried_tokens", "mixed_steps", "mixed_graph_steps", "preemptions",
                  "generated_tokens"):
            row[k] = r.get(k, 0) - p.get(k, 0)
        for k in tot:
            tot[k] += row[k]
        per.append(row)
    rows_run = sum(int(k.split(":")[0]) * n for k, n in steps_all.items() if not k.startswith("0:"))
    lat = {what: _add_counts(LH.difference(r.get(what, []), prev.get(r["replica"], {}).get(what, []))
                             for r in after) for what in LATENCY_COUNTS}
    return {"per_replica": per, "decode_steps": steps_all, "graph_hit": C.graph_hit_rate(steps_all),
            "rows_run": rows_run, **tot, **lat, "split": [row["sequences"] for row in per]}


# the replicas' own histograms (counters()) -> the name of their percentiles, replica_<name>_ms_p<q>
LATENCY_COUNTS = {"ttft_ms_counts": "ttft", "tpot_ms_counts": "tpot", "arrival_ms_counts": "arrival"}


def _add_counts(lists: Iterable[list[int]]) -> list[int]:
    """Element-wise sum of histogram counts; empty lists (not reported) are skipped."""
    out: list[int] = []
    for counts in lists:
        if counts and not out:
            out = list(counts)
        elif counts and len(counts) == len(out):
            out = [a + b for a, b in zip(out, counts)]
    return out


INGRESS_COUNTS = ("prepare_ms_counts", "first_item_ms_counts")   # the ingress's own (Frontend.latency)


def ingress_latency(before: list[dict], after: list[dict]) -> dict:
    """p50/p99 (ms) of the ingress replicas' prepare() and streams' first items between two
    `counters()` snapshots (ingress replicas matched by pid; None: not reported)."""
    prev = {r.get("pid"): r for r in before}
    out = {}
    for what in INGRESS_COUNTS:
        counts = _add_counts(LH.difference(r.get(what, []), prev.get(r.get("pid"), {}).get(what, []))
                             for r in after)
        for q in (50, 99):
            out[f"ingress_{what[:-10]}_ms_p{q}"] = LH.percentile(counts, q)
    return out


def replica_latency(delta: dict) -> dict:
    """TTFT, TPOT and arrival delay (ingress prepared -> replica) p50/p99 (ms) as the replicas
    measured them (None: not reported)."""
    return {f"replica_{name}_ms_p{q}": LH.percentile(delta.get(what) or [], q)
            for what, name in LATENCY_COUNTS.items() for q in (50, 99)}


def _steps(counters: dict) -> dict:
    return {(int(b), str(path)): int(n) for b, path, n in counters.get("decode_steps", [])}


def _sum(d: Optional[dict]) -> int:
    return sum(int(v) for v in (d or {}).values())


def _span(buckets) -> Optional[str]:
    return f"{buckets[0]}..{buckets[-1]} ({len(buckets)})" if buckets else None


# ---------------------------------------------------------------- one phase

def _ttft(r: dict) -> Optional[float]:
    if r["t_first"] is not None:
        return r["t_first"] - r["t_send"]
    return r["cut"] - r["t_send"] if r.get("cut") and not r["error"] else None


def _tpot(r: dict) -> Optional[float]:
    if r["tokens"] > 1 and r["t_first"] is not None and r["t_last"] is not None and not r["error"]:
        return (r["t_last"] - r["t_first"]) / (r["tokens"] - 1)
    return None


def seq_stats(recs: list[dict]) -> dict:
    ttft = [x for x in map(_ttft, recs) if x is not None]
    tpot = [x for x in map(_tpot, recs) if x is not None]
    ms = lambda v, q: None if not v else C.percentile(v, q) * 1e3  # noqa: E731
    return {"sequences": len(recs), "errors": sum(bool(r["error"]) for r in recs),
            "cut": sum(bool(r.get("cut")) for r in recs),
            "censored_ttft": sum(r["t_first"] is None and bool(r.get("cut")) and not r["error"] for r in recs),
            "tokens": sum(r["tokens"] for r in recs if not r["error"]),
            "ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99),
            "tpot_ms_p50": ms(tpot, 50), "tpot_ms_p99": ms(tpot, 99)}


def phase_metrics(recs: list[dict], t0: float, t_stop: float, delta: dict, generated: Optional[int] = None) -> dict:
    """`generated`: output tokens the replicas generated from the phase start to its stop (counters
    snapshot at the stop; None: `delta`'s). The phase's tokens/s counts those: a client cannot count
    the tokens of an HTTP stream cut before its end (events carry only non-empty text, and a random
    llama-8b's tokens mostly decode to none); the client's own count is `client_tokens_per_s`."""
    wall = max(t_stop - t0, 1e-9)
    m = {name: seq_stats([r for r in recs if kinds is None or r["kind"] in kinds]) for name, kinds in GROUPS.items()}
    m["chat_followup"] = seq_stats([r for r in recs if r["kind"] == "chat" and r.get("turn", 1) >= 2])
    tokens = delta["generated_tokens"] if generated is None else generated
    m.update(wall_s=wall, tokens=tokens, tokens_per_s=tokens / wall, client_tokens_per_s=m["all"]["tokens"] / wall,
             graph_hit=delta["graph_hit"], padding_waste=_ratio(delta["padded_rows"], delta["rows_run"]),
             prefix_hit_rate=_ratio(delta["prefix_hit_tokens"], delta["prefix_queried_tokens"]),
             split=delta["split"], replicas=delta, **replica_latency(delta),
             errors_seen=sorted({r["error"] for r in recs if r["error"]})[:5])
    m["samples"] = {"ttft_ms": _samples(recs, _ttft), "tpot_ms": _samples(recs, _tpot)}
    return m


def _samples(recs, fn) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in recs:
        x = fn(r)
        if x is not None:
            key = "chat_followup" if r["kind"] == "chat" and r.get("turn", 1) >= 2 else r["kind"]
            out.setdefault(key, []).append(round(x * 1e3, 2))
    return out


def _ratio(x, y) -> Optional[float]:
    return x / y if x is not None and y else None


# ---------------------------------------------------------------- pooled over seeds

def pool(phases: Iterable[dict]) -> dict:
    """Phases of one router taken together: summed tokens over summed wall, percentiles over every
    sequence, replica counters summed."""
    phases = [p for p in phases if p]
    if not phases:
        return {}
    wall, toks = sum(p["wall_s"] for p in phases), sum(p["tokens"] for p in phases)
    samples: dict[str, dict[str, list]] = {"ttft_ms": {}, "tpot_ms": {}}
    steps, tot = {}, {"padded_rows": 0, "rows_run": 0, "prefix_hit_tokens": 0, "prefix_queried_tokens": 0}
    split, lat = None, {}
    for p in phases:
        for what, by in p["samples"].items():
            for kind, v in by.items():
                samples[what].setdefault(kind, []).extend(v)
        for k, n in p["replicas"]["decode_steps"].items():
            steps[k] = steps.get(k, 0) + n
        for k in tot:
            tot[k] += p["replicas"][k]
        split = [a + b for a, b in zip(split, p["split"])] if split else list(p["split"])
        for what in LATENCY_COUNTS:
            lat[what] = _add_counts([lat.get(what, []), p["replicas"].get(what) or []])
    pick = lambda what, kinds: [x for k, v in samples[what].items() if k in kinds for x in v]  # noqa: E731
    out = {"phases": len(phases), "tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall,
           "graph_hit": C.graph_hit_rate(steps), "padding_waste": _ratio(tot["padded_rows"], tot["rows_run"]),
           "prefix_hit_rate": _ratio(tot["prefix_hit_tokens"], tot["prefix_queried_tokens"]), "split": split,
           **replica_latency(lat)}
    for name, kinds in (("all", EVERY), ("interactive", PERSON), ("chat", CHAT),
                        ("chat_followup", ("chat_followup",))):
        for what in ("ttft_ms", "tpot_ms"):
            v = pick(what, kinds)
            out[f"{name}_{what}_p50"] = C.percentile(v, 50)
            out[f"{name}_{what}_p99"] = C.percentile(v, 99)
    return out


def summarize(res: dict) -> dict:
    """{trace: {kind: {"ours": pooled, "default": pooled, "ratio": ours/default}}} over the phases
    both routers ran; kind in burst, lo, hi, open (lo + hi)."""
    ours, dflt = (res["routers"].get(n, {}).get("phases", {}) for n in ("ours", "default"))
    both = [k for k in ours if k in dflt and ours[k] and dflt[k]]
    out: dict = {}
    for trace in res["args"]["traces"].split(","):
        out[trace] = {}
        for kind, members in (*((k, (k,)) for k in KINDS), ("open", ("lo", "hi"))):
            keys = [k for k in both if k.startswith(trace + "/") and k.rsplit("/", 1)[1] in members]
            o, d = pool(ours[k] for k in keys), pool(dflt[k] for k in keys)
            out[trace][kind] = {"phases": keys, "ours": o, "default": d,
                                "ratio": {k: _ratio(v, d.get(k)) for k, v in o.items()
                                          if isinstance(v, (int, float)) and k not in ("phases",)}}
    return out


def bars(res: dict, summary: dict) -> dict:
    """The issue's bars, against the default router on the same replicas in the same run."""
    out = {}
    for trace, by in summary.items():
        r = by["burst"]["ratio"].get("tokens_per_s")
        if r is not None:
            out[f"capacity_tokens_per_s_ours>=1.2x_default[{trace}]"] = r >= 1.2
        o, d = by["open"]["ours"].get("interactive_ttft_ms_p99"), by["open"]["default"].get("interactive_ttft_ms_p99")
        if o is not None and d is not None:
            out[f"interactive_ttft_p99_ours<=default[{trace}]"] = o <= d
        o, d = (by["open"][n].get("chat_ttft_ms_p50") for n in ("ours", "default"))
        if o is not None and d:          # every multi-turn trace (chat, chat-long)
            out[f"multi_turn_ttft_p50_ours<=0.5x_default[{trace}]"] = o <= 0.5 * d
    ours = pool((res["routers"].get("ours") or {}).get("phases", {}).values())
    if ours.get("graph_hit") is not None:
        out["graph_hit_ours>=0.99"] = ours["graph_hit"] >= 0.99
    return out


def headline(res: dict, summary: dict) -> None:
    """Top-level numbers of the result file (the burst ratio keeps issue 3's key)."""
    keys = [(t, "burst") for t in summary]
    o = pool(p for t, k in keys for p in _phases(res, "ours", summary[t][k]["phases"]))
    d = pool(p for t, k in keys for p in _phases(res, "default", summary[t][k]["phases"]))
    if o and d:
        res["burst_tokens_per_s_ours_over_default"] = o["tokens_per_s"] / d["tokens_per_s"]
    for what in ("graph_hit", "padding_waste", "prefix_hit_rate"):
        res[what] = {name: pool(r.get("phases", {}).values()).get(what) for name, r in res["routers"].items()}


def _phases(res, router, keys):
    ph = (res["routers"].get(router) or {}).get("phases", {})
    return [ph[k] for k in keys if k in ph]


# ---------------------------------------------------------------- the table

def print_summary(res: dict, summary: dict) -> None:
    env = res["env"]
    print(f"\ncard {env['card']} x{res.get('gpus')}, model {res['args']['model']}, layout {res['args']['layout']}, "
          f"torch {env['torch']}; ratios ours/default, phases pooled over seeds")
    cols = [("row", "trace:phase", 12), ("n", "n", 2), ("tok_s", "tok/s", 6), ("ttft50", "ttft50", 6),
            ("ittft99", "ittft99", 7), ("tpot50", "tpot50", 6), ("tpot99", "tpot99", 6),
            ("tok_s_o", "tok/s(o)", 9), ("hit", "hit o/d", 9), ("pad", "pad o/d", 9), ("pfx", "prefix o/d", 11),
            ("split", "split o | d", 17)]
    rows = []
    for trace, by in summary.items():
        for kind in (*KINDS, "open"):
            s = by[kind]
            o, d, r = s["ours"], s["default"], s["ratio"]
            if not o or not d:
                continue
            rows.append({"row": f"{trace}:{kind}", "n": o["phases"], "tok_s": r.get("tokens_per_s"),
                         "ttft50": r.get("all_ttft_ms_p50"), "ittft99": r.get("interactive_ttft_ms_p99"),
                         "tpot50": r.get("all_tpot_ms_p50"), "tpot99": r.get("all_tpot_ms_p99"),
                         "tok_s_o": f"{o['tokens_per_s']:.0f}", "hit": _pair(o, d, "graph_hit"),
                         "pad": _pair(o, d, "padding_waste"), "pfx": _pair(o, d, "prefix_hit_rate"),
                         "split": f"{_split(o)} | {_split(d)}"})
    C.print_table(rows, cols)
    for trace, by in summary.items():
        chat = by.get("open", {})
        if chat.get("ours", {}).get("chat_ttft_ms_p50") is None or not chat.get("default"):
            continue
        print(f"{trace} TTFT p50 ms (open loop, ours / default): all turns "
              f"{C.fmt(chat['ours']['chat_ttft_ms_p50'], '.1f')} / "
              f"{C.fmt(chat['default']['chat_ttft_ms_p50'], '.1f')}, turns >= 2 "
              f"{C.fmt(chat['ours']['chat_followup_ttft_ms_p50'], '.1f')} / "
              f"{C.fmt(chat['default']['chat_followup_ttft_ms_p50'], '.1f')}")
    print("(tok/s at burst = capacity; ittft99 = TTFT p99 of HTTP requests and chat turns; split = sequences "
          "per replica rank)")
    print("burst tok/s ours/default:", C.fmt(res.get("burst_tokens_per_s_ours_over_default")),
          "| graph-hit", _fmt_map(res.get("graph_hit")), "| padding", _fmt_map(res.get("padding_waste")),
          "| prefix hit", _fmt_map(res.get("prefix_hit_rate")))
    print("bars:", res.get("bars"))
    if res.get("skipped"):
        print(f"skipped ({len(res['skipped'])}):", "; ".join(res["skipped"])[:600])


def _pair(o: dict, d: dict, key: str) -> str:
    return f"{C.fmt(o.get(key), '.2f')}/{C.fmt(d.get(key), '.2f')}"


def _split(p: dict) -> str:
    s = p.get("split") or []
    return ":".join(str(x) for x in s)


def _fmt_map(m: Optional[dict]) -> str:
    return ", ".join(f"{k} {C.fmt(v)}" for k, v in (m or {}).items())
