"""How sure a serve_load bar is: intervals for its ratios, from the samples in its result file.

A bar compares two numbers each run measured once (ours and the default's), and some rest on few
samples: the heavy trace's open loops carry 4-22 interactive requests per phase, so a pooled TTFT
p99 over six phases is close to the largest of ~60 values. For each trace this gives:
- `capacity_by_seed`: ours / default burst tokens/s per seed (the bar pools them; their spread is
  how much one seed moves it);
- `interactive_ttft_p99`, `multi_turn_ttft_p50` (open loop): the pooled ratio and a 90% bootstrap
  interval (each router's sequences resampled with replacement, `rounds` times, seeded);
- the same two with `_by_phase`: a paired cluster bootstrap that resamples whole phases (the same
  phase keys for both routers), then pools their requests. Requests of one phase share its
  replicas' state, so they are not independent: on two replicas single phases' p99s swung 2-3x
  within one router (session 10: chat 67-132 ms for the default, 89-271 ms for ours), and one
  outlier phase moved the pooled chat p99 ratio from 0.46 to 1.46 between two runs whose
  request-level intervals were both narrow. The phase interval is the one to trust.
An interval that holds 1.0 (or 0.5 for the multi-turn bar) says this run cannot tell the routers
apart on that bar. Pure Python over the JSON; no Ray.

    python3 benchmarks/serve_spread.py benchmarks/results/serve_load-tiers-session7-2xh200-2026-11-30.json
"""
from __future__ import annotations

import json
import os
import random
import sys
from typing import Mapping, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import percentile  # noqa: E402
from benchmarks.serve_report import CHAT, PERSON  # noqa: E402


def bootstrap_ratio(ours: Sequence[float], default: Sequence[float], q: float, rounds: int = 2000,
                    seed: int = 0, level: float = 0.90) -> Optional[dict]:
    """ratio = p_q(ours) / p_q(default) and its `level` bootstrap interval; None without samples."""
    if not ours or not default or not percentile(default, q):
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(rounds):
        o = [ours[rng.randrange(len(ours))] for _ in ours]
        d = [default[rng.randrange(len(default))] for _ in default]
        pd = percentile(d, q)
        if pd:
            ratios.append(percentile(o, q) / pd)
    tail = (1 - level) / 2 * 100
    return {"ratio": percentile(ours, q) / percentile(default, q), "lo": percentile(ratios, tail),
            "hi": percentile(ratios, 100 - tail), "n_ours": len(ours), "n_default": len(default)}


def bootstrap_ratio_by_phase(ours: Mapping[str, Sequence[float]], default: Mapping[str, Sequence[float]],
                             q: float, rounds: int = 2000, seed: int = 0, level: float = 0.90) -> Optional[dict]:
    """The pooled ratio p_q(ours) / p_q(default) with a paired cluster-bootstrap interval: each
    round draws len(keys) phase keys with replacement and pools both routers' samples of those
    phases. None without a phase that both routers have samples for."""
    keys = [k for k in ours if ours[k] and default.get(k)]
    if not keys:
        return None
    pool = lambda by, ks: [x for k in ks for x in by[k]]  # noqa: E731
    base_d = percentile(pool(default, keys), q)
    if not base_d:
        return None
    rng = random.Random(seed)
    ratios = []
    for _ in range(rounds):
        pick = [keys[rng.randrange(len(keys))] for _ in keys]
        pd = percentile(pool(default, pick), q)
        if pd:
            ratios.append(percentile(pool(ours, pick), q) / pd)
    tail = (1 - level) / 2 * 100
    return {"ratio": percentile(pool(ours, keys), q) / base_d, "lo": percentile(ratios, tail),
            "hi": percentile(ratios, 100 - tail), "phases": len(keys)}


def _by_phase(res: dict, router: str, keys: Sequence[str], kinds: Sequence[str]) -> dict[str, list[float]]:
    phases = res["routers"].get(router, {}).get("phases", {})
    return {k: [x for kind, v in (phases.get(k) or {}).get("samples", {}).get("ttft_ms", {}).items()
                if kind in kinds for x in v] for k in keys}


def _samples(res: dict, router: str, keys: Sequence[str], kinds: Sequence[str]) -> list[float]:
    return [x for v in _by_phase(res, router, keys, kinds).values() for x in v]


def spread(res: dict, rounds: int = 2000) -> dict:
    """{trace: capacity_by_seed, interactive_ttft_p99, multi_turn_ttft_p50} over a serve_load result
    with its `summary` (phases both routers ran)."""
    out = {}
    ours_ph = res["routers"].get("ours", {}).get("phases", {})
    dflt_ph = res["routers"].get("default", {}).get("phases", {})
    for trace, by in res["summary"].items():
        bursts = by["burst"]["phases"]
        row = {"capacity_by_seed": {k.split("/")[1]: ours_ph[k]["tokens_per_s"] / dflt_ph[k]["tokens_per_s"]
                                    for k in bursts if dflt_ph[k]["tokens_per_s"]}}
        open_keys = by["open"]["phases"]
        row["interactive_ttft_p99"] = bootstrap_ratio(_samples(res, "ours", open_keys, PERSON),
                                                      _samples(res, "default", open_keys, PERSON), 99, rounds)
        chat = [_samples(res, r, open_keys, CHAT) for r in ("ours", "default")]
        row["multi_turn_ttft_p50"] = bootstrap_ratio(chat[0], chat[1], 50, rounds) if chat[0] else None
        person = [_by_phase(res, r, open_keys, PERSON) for r in ("ours", "default")]
        row["interactive_ttft_p99_by_phase"] = bootstrap_ratio_by_phase(*person, 99, rounds)
        chat_ph = [_by_phase(res, r, open_keys, CHAT) for r in ("ours", "default")]
        row["multi_turn_ttft_p50_by_phase"] = (bootstrap_ratio_by_phase(*chat_ph, 50, rounds)
                                               if chat[0] else None)
        out[trace] = row
    return out


def print_spread(sp: dict) -> None:
    """One line per trace: 90% intervals by requests and, after '|', by whole phases."""
    def fmt(row: dict, key: str) -> str:
        b, p = row.get(key), row.get(key + "_by_phase")
        if not b:
            return "-"
        by_phase = f" | [{p['lo']:.2f}, {p['hi']:.2f}] {p['phases']} ph" if p else ""
        return f"{b['ratio']:.2f} [{b['lo']:.2f}, {b['hi']:.2f}] n={b['n_ours']}/{b['n_default']}{by_phase}"
    print(f"{'trace':10s} {'capacity by seed':24s} {'interactive TTFT p99 (90%: requests | phases)':52s} "
          "multi-turn TTFT p50 (same)")
    for trace, row in sp.items():
        cap = " ".join(f"{s}:{r:.2f}" for s, r in row["capacity_by_seed"].items())
        print(f"{trace:10s} {cap:24s} {fmt(row, 'interactive_ttft_p99'):52s} {fmt(row, 'multi_turn_ttft_p50')}")


def main(argv=None) -> None:
    for path in (argv if argv is not None else sys.argv[1:]):
        with open(path) as f:
            res = json.load(f)
        print(os.path.basename(path))
        print_spread(spread(res))


if __name__ == "__main__":
    main()
