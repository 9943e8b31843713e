"""serve_load's bursts against the roofline: how much of its GPUs' roofline the Serve path delivers.

Issue 8 asks for serving's tokens/s per GPU at capacity next to the engine's own figure. The two
bursts differ (engine_capacity: 500 requests, prompt and output U[200,400]; serve_load's mix: ~450
sequences with 3.5x more prompt than output tokens), so raw tokens/s do not compare. Their fraction
of the roofline does. For every burst phase of a serve_load result:

    T_roof = benchmarks.roofline.roofline(the phase's sequences split evenly over the GPUs)
    fraction = T_roof / the phase's wall time (first send to last token)

The roofline depends only on the sequence count and the prompt and output sums, so an even split
is 1/G of each. Requests arrive at once, so the wall is the same span engine_capacity times.

- Rates: serve_load does not measure the GEMM rate or the copy bandwidth (its GPUs belong to the
  replicas). They come from an engine_capacity result file on the same kind of card (`--rates`),
  so the fraction is not from one run: a few percent either way.
- KV tokens per GPU: the replicas' own `total_blocks` from the serve_load file.
- Phases used: none cut, no errors, every planned output token delivered. Chat traces are left
  out: their turns resend history that the prefix cache serves, so prompt FLOPs overstate the work
  and the fraction would not be a bound (engine_capacity's multi-turn reads 1.98).

  python benchmarks/serve_roofline.py benchmarks/results/serve_load-....json \
      --rates benchmarks/results/engine_capacity-session11-8b-h200-2026-11-30.json [--out x.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import roofline as RF  # noqa: E402

TRACES = ("mix", "heavy")          # no prompt is shared: the roofline's prefill term holds


def phase_roofline(model: str, work: dict, gpus: int, kv_tokens: int, gemm_Fps: float, copy_Bps: float) -> dict:
    """T_roof of one burst's sequences split evenly over `gpus` GPUs. `work`: serve_load's
    workload entry (sequences, prompt_tokens_first, output_tokens)."""
    n = work["sequences"] / gpus
    prompt, output = work["prompt_tokens_first"] / gpus, work["output_tokens"] / gpus
    # roofline() reads only n and the two sums: one representative request, n times
    share = [(prompt / n, output / n)] * max(1, round(n))
    return RF.roofline(model, share, kv_tokens, gemm_Fps, copy_Bps)


def usable(phase: dict, work: dict) -> bool:
    every = phase["all"]
    return not every["cut"] and not every["errors"] and phase["tokens"] == work["output_tokens"]


def fractions(result: dict, rates: dict) -> dict:
    """{trace: {router: {phases, t_roof_s, wall_s, roofline_fraction, tokens_per_s_per_gpu}}},
    pooled over the trace's usable burst phases (sum of T_roof over sum of wall)."""
    model = result["app_args"]["model"].removeprefix("random:")
    gemm, bw = rates["gemm_TFLOPs"] * 1e12, rates["copy_GBps"] * 1e9
    out: dict = {}
    for name, router in result["routers"].items():
        gpus = len({g for r in router["replicas"] for g in r["gpu_ids"]})
        kv_tokens = min(r["total_blocks"] - 1 for r in router["replicas"]) * result["app_args"]["block_size"]
        for key, phase in router["phases"].items():
            trace, _, kind = key.split("/")
            work = result["workload"].get(key)
            if trace not in TRACES or kind != "burst" or work is None or not usable(phase, work):
                continue
            roof = phase_roofline(model, work, gpus, kv_tokens, gemm, bw)
            acc = out.setdefault(trace, {}).setdefault(name, {"phases": 0, "t_roof_s": 0.0, "wall_s": 0.0,
                                                              "tokens": 0, "gpus": gpus})
            acc["phases"] += 1
            acc["t_roof_s"] += roof["t_roof_s"]
            acc["wall_s"] += phase["wall_s"]
            acc["tokens"] += phase["tokens"]
    for per_router in out.values():
        for acc in per_router.values():
            acc["roofline_fraction"] = acc["t_roof_s"] / acc["wall_s"]
            acc["tokens_per_s_per_gpu"] = acc["tokens"] / acc["wall_s"] / acc["gpus"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", help="a serve_load result file")
    ap.add_argument("--rates", required=True, help="an engine_capacity result file on the same card kind")
    ap.add_argument("--out")
    a = ap.parse_args()
    with open(a.result) as f:
        result = json.load(f)
    with open(a.rates) as f:
        rates = json.load(f)
    table = fractions(result, rates)
    engine = rates.get("summary", {}).get("roofline_fraction")
    print(f"card {result['env'].get('card')} ({result.get('gpus')} GPUs); rates from {os.path.basename(a.rates)}: "
          f"GEMM {rates['gemm_TFLOPs']:.0f} TFLOP/s, copy {rates['copy_GBps']:.0f} GB/s; engine burst alone {engine:.3f}")
    for trace, per_router in table.items():
        for name, acc in per_router.items():
            print(f"{trace:6s} {name:8s} {acc['phases']} bursts  {acc['tokens_per_s_per_gpu']:8.0f} tok/s per GPU  "
                  f"roofline {acc['roofline_fraction']:.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"result": os.path.basename(a.result), "rates": os.path.basename(a.rates),
                       "card": result["env"].get("card"), "engine_burst_roofline_fraction": engine,
                       "traces": table}, f, indent=1)


if __name__ == "__main__":
    main()
