"""How steady are the two device rates the bounds divide by? (benchmarks/roofline.py)

Sessions 4-23 read the bf16 GEMM rate at 715-798 TFLOP/s and the copy rate at 3960-4175 GB/s, one
reading per run, each the median of 10 single calls timed with a sync apiece. The roofline fraction
moves with them one for one. This probe takes, in one process, `--rounds` readings of each rate by
the old method (single timed calls) and sustained (back-to-back calls after a warm-up; both
through roofline.seconds_per_call), alternating, then soaks the card with `--soak-s` of matmuls,
reads both again, and reports each method's spread. Usage on the GPU host: python3 benchmarks/rate_probe.py --out F.json
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from benchmarks import common as C
from benchmarks import roofline as RF


def readings(op, work: float, device, rounds: int) -> dict:
    """`rounds` alternating readings of `work / seconds` by both methods, and their spreads."""
    out = {"single": [], "sustained": []}
    for _ in range(rounds):
        out["single"].append(work / RF.seconds_per_call(op, device, **RF.SINGLE_CALLS))
        out["sustained"].append(work / RF.seconds_per_call(op, device))
    for k in list(out):
        v = out[k]
        out[k + "_spread"] = (max(v) - min(v)) / statistics.median(v)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--soak-s", type=float, default=20.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev, n, nbytes = "cuda", 8192, 1 << 30
    x, y, z = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(3))
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    gemm = functools.partial(torch.matmul, x, y, out=z)
    copy = functools.partial(dst.copy_, src)
    rec = {"env": C.env_info(dev), "args": vars(a)}
    rec["cool"] = {"gemm_TFLOPs": readings(gemm, 2 * n ** 3 / 1e12, dev, a.rounds),
                   "copy_GBps": readings(copy, 2 * nbytes / 1e9, dev, a.rounds)}
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < a.soak_s:
        for _ in range(50):
            gemm()
        C.sync(dev)
    rec["after_soak"] = {"gemm_TFLOPs": readings(gemm, 2 * n ** 3 / 1e12, dev, a.rounds),
                         "copy_GBps": readings(copy, 2 * nbytes / 1e9, dev, a.rounds)}
    for phase in ("cool", "after_soak"):
        for rate, r in rec[phase].items():
            C.log(f"{phase:10s} {rate:12s} single {min(r['single']):7.0f}-{max(r['single']):7.0f} "
                  f"(spread {r['single_spread']:.3f})  sustained {min(r['sustained']):7.0f}-"
                  f"{max(r['sustained']):7.0f} (spread {r['sustained_spread']:.3f})")
    C.write_json(C.out_path(a.out, "rate_probe.json"), rec)


if __name__ == "__main__":
    main()
