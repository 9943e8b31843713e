"""Do CUDA green contexts give decode attention SMs of its own beside the GEMMs?

overlap_probe's pipelined schedule (GEMMs of one half-batch beside the attention of the other)
lost to the serial step in sessions 8, 9 and 12: with a cuBLASLt SM carveout nothing keeps the
attention's CTAs off the GEMMs' SMs or the other way round. A green context partitions the SMs in
the driver: a kernel launched on its stream runs only on its SMs. This probe puts the GEMMs on a
green context of all SMs but P (torch.cuda.green_contexts, beta), and attention on the primary
context or on a green context of the other P SMs, runs the pipelined schedule with each kind of
op on its own stream (with and without cuBLASLt's carveout of P), and times it per layer against
the serial step on the whole GPU, in one process (benchmarks/confined_attention_probe.py measured
what the engine's attention reads on P SMs: 38-48 GB/s per SM). A variant that fails (an API this
torch lacks, a partition size the driver refuses) is recorded and skipped. Eager, wall-clock
timed per call of `--layers` layers. Session 14 on an H200: every variant lost to the serial
layer, x1.04 at best (results/green_overlap-8b-h200-2026-12-01.json).

    python3 benchmarks/green_overlap_probe.py --out $OUT/green_overlap.json   # GPU, ~1 min
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks.overlap_probe import Layer, blas, pipelined, serial  # noqa: E402
from replica.presets import PRESETS  # noqa: E402


def wall_ms(fn, stream: torch.cuda.Stream, repeats: int) -> float:
    """Milliseconds per call of fn(), launched with `stream` current: host wall clock between two
    device synchronizations (events would have to be recorded across contexts), best of the
    repeats after one warm-up call. Includes one launch latency per call (tens of us)."""
    best = float("inf")
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.synchronize()
        if i:
            best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def green_streams(attention_sms: int, both: bool) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(GEMM stream, attention stream). The GEMMs' stream belongs to a green context of all SMs but
    `attention_sms`; attention's to one of `attention_sms` SMs (`both`), or to the primary context,
    where its CTAs take whatever SMs the running GEMM leaves (its CTAs hold an SM's shared
    memory). Triton loads its kernels into the context current at their first launch, so a green
    attention stream may refuse a kernel loaded in the primary one: recorded if so."""
    from torch.cuda.green_contexts import GreenContext
    total = torch.cuda.get_device_properties(0).multi_processor_count
    gemm = GreenContext.create(num_sms=total - attention_sms)
    _LIVE.append(gemm)                  # a collected GreenContext destroys its context and streams
    if not both:
        return gemm.Stream(), torch.cuda.Stream()
    att = GreenContext.create(num_sms=attention_sms)
    _LIVE.append(att)
    return gemm.Stream(), att.Stream()


_LIVE: list = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--attention-sms", default="16,24,32,40,48,64")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    p = PRESETS[a.model]
    layer = Layer(p, a.rows, a.ctx, 16, "cuda", torch.bfloat16)
    x = torch.randn(a.rows, p["hidden_size"], device="cuda", dtype=torch.bfloat16)
    rec = {"env": C.env_info("cuda"), "args": vars(a),
           "sms": torch.cuda.get_device_properties(0).multi_processor_count, "ms_per_layer": {}, "errors": {}}
    plain = torch.cuda.Stream()
    per_layer = lambda fn, s: wall_ms(fn, s, a.repeats) / a.layers   # noqa: E731
    res = rec["ms_per_layer"]
    res["serial"] = per_layer(lambda: serial(layer, x, a.layers), plain)
    C.log(f"serial                       {res['serial']:.4f} ms/layer")
    for sms in [int(s) for s in a.attention_sms.split(",")]:
        for both, carve in ((False, False), (False, True), (True, True)):
            key = f"green-gemm{'+att' if both else ''}/att{sms}" + ("/carveout" if carve else "")
            try:
                gemm_s, att_s = green_streams(sms, both)
                with blas("cublaslt" if carve else "cublas", sms if carve else None):
                    res[key] = per_layer(lambda: pipelined(layer, x, a.layers, att_s), gemm_s)
            except Exception as e:      # recorded, not fatal: the next variant may work
                rec["errors"][key] = f"{type(e).__name__}: {str(e)[:300]}"
                C.log(f"{key:36s} failed: {rec['errors'][key]}")
                continue
            C.log(f"{key:36s} {res[key]:.4f} ms/layer  x{res[key] / res['serial']:.3f} of serial")
    side = torch.cuda.Stream()
    res["pipelined/plain"] = per_layer(lambda: pipelined(layer, x, a.layers, side), plain)
    C.log(f"pipelined/plain              {res['pipelined/plain']:.4f} ms/layer  "
          f"x{res['pipelined/plain'] / res['serial']:.3f} of serial")
    C.write_json(C.out_path(a.out, "green_overlap"), rec)


if __name__ == "__main__":
    main()
