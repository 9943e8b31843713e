"""How fast does the engine's own decode attention read on P SMs, when it fills them?

The 0.70 roofline bar needs decode attention to run beside the GEMMs on SMs of its own
(docs/perf-notes.md, lead 1). Earlier probes confined attention by giving it P *programs*, one
per SM: 20-27 GB/s per SM (sessions 9 and 12), because one program has one tile chain in flight.
The engine's grid kernel reads ~4 TB/s on all 132 SMs of an H200 with several CTAs resident per
SM, ~30 GB/s per SM: a whole-chip limit, which says nothing of what one SM can do when its
neighbours are busy. This probe measures that: a hold kernel occupies every thread slot of the
SMs numbered P and up (each of its CTAs reads %smid, leaves at once below P, and spins on
%globaltimer otherwise), and while it spins, the engine's unchanged `paged_decode_attention`
runs on another stream, so its CTAs can only land on the P free SMs, as many per SM as fit.
`stream_sum` (benchmarks/sm_read_probe.py, no math between loads) runs the same way as the
ceiling. If attention reads well above 27 GB/s per SM there, a partition needs no new attention
kernel, only a way to keep the GEMMs off its SMs.

    python3 benchmarks/confined_attention_probe.py --out $OUT/confined_attention.json   # GPU, ~1 min
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks.overlap_probe import ATTENTION_CONFIGS, Layer  # noqa: E402
from benchmarks.sm_read_probe import stream_sum  # noqa: E402
from replica.presets import PRESETS  # noqa: E402

# Smaller tiles, fewer warps or stages: more CTAs resident per free SM (session 15 asks whether more,
# smaller tile chains in flight read faster per SM than the engine's 3-4 CTAs of w4s2n64)
SMALL_CONFIGS = {"w4s1n64": dict(num_warps=4, num_stages=1, block_n=64),
                 "w4s2n32": dict(num_warps=4, num_stages=2, block_n=32),
                 "w4s3n32": dict(num_warps=4, num_stages=3, block_n=32),
                 "w2s2n32": dict(num_warps=2, num_stages=2, block_n=32),
                 "w2s1n64": dict(num_warps=2, num_stages=1, block_n=64)}
HOLD_WARPS = 32          # 1024 threads per CTA: two CTAs fill an SM's 2048 thread slots
HOLD_CTAS_PER_SM = 2


@triton.jit
def _sm_id():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _now_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _hold_kernel(done_ptr, free_below, hold_ns):
    # a CTA on an SM numbered below free_below leaves at once; the others spin for hold_ns, then
    # count themselves done (the host checks that every holder ran)
    if _sm_id() >= free_below:
        start = _now_ns()
        while _now_ns() - start < hold_ns:
            pass
        tl.atomic_add(done_ptr, 1)


def sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def confined_ms(run, free_sms: int, calls: int, hold_ms: float) -> tuple[float, int]:
    """Milliseconds per call of `run()` on another stream while the SMs numbered `free_sms` and up
    are held; and how many hold CTAs spun (0 when nothing was held)."""
    done = torch.zeros(1, dtype=torch.int32, device="cuda")
    hold, side = torch.cuda.Stream(), torch.cuda.Stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    if free_sms < sm_count():
        with torch.cuda.stream(hold):
            _hold_kernel[(HOLD_CTAS_PER_SM * sm_count(),)](done, free_sms, int(hold_ms * 1e6),
                                                           num_warps=HOLD_WARPS)
        time.sleep(0.002)                     # the holders are resident and the others gone
    with torch.cuda.stream(side):
        start.record()
        for _ in range(calls):
            run()
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls, int(done.item())


def measure(name: str, run, nbytes: int, free: list[int], calls: int, hold_ms: float) -> dict:
    run()                                       # compile outside the timed window
    torch.cuda.synchronize()
    rows = {}
    for p in free:
        ms, held = confined_ms(run, p, calls, hold_ms)
        expect = 0 if p >= sm_count() else HOLD_CTAS_PER_SM * (sm_count() - p)
        rows[p] = {"ms": ms, "gbps": nbytes / ms / 1e6, "gbps_per_sm": nbytes / ms / 1e6 / p,
                   "holders": held, "holders_expected": expect,
                   # valid when every holder ran and the calls ended inside the hold window
                   "valid": held == expect and (p >= sm_count() or ms * calls < 0.8 * hold_ms)}
        r = rows[p]
        C.log(f"{name:12s} P={p:3d}: {r['gbps']:6.0f} GB/s, {r['gbps_per_sm']:5.1f} per SM, "
              f"holders {held}/{expect}{'' if r['valid'] else '  (INVALID)'}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--free", default="8,16,22,33,44,66,132")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--hold-ms", type=float, default=200.0)
    ap.add_argument("--configs", action="store_true", help="also overlap_probe's attention configs")
    ap.add_argument("--small-configs", action="store_true", help="also SMALL_CONFIGS (more CTAs per SM)")
    ap.add_argument("--no-stream", action="store_true", help="skip the stream_sum ceiling")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    free = sorted({min(int(p), sm_count()) for p in a.free.split(",")})
    layer = Layer(PRESETS[a.model], a.rows, a.ctx, 16, "cuda", torch.bfloat16)
    q = torch.randn(a.rows, layer.h, layer.hd, device="cuda", dtype=torch.bfloat16)
    rec = {"env": C.env_info("cuda"), "args": vars(a), "sms": sm_count(), "kv_bytes": layer.kv_bytes(),
           "copy_gbps": None, "attention": {}, "stream_sum": {}}
    rec["attention"] = measure("attention", lambda: layer.attend(q, 0), layer.kv_bytes(), free, a.calls, a.hold_ms)
    configs = {**(ATTENTION_CONFIGS if a.configs else {}), **(SMALL_CONFIGS if a.small_configs else {})}
    if configs:        # the same grid kernel with other tiles, warps and stages
        rec["attention_configs"] = {
            name: measure(f"att {name}", lambda cfg=cfg: layer.attend(q, 0, **cfg), layer.kv_bytes(), free,
                          a.calls, a.hold_ms)
            for name, cfg in configs.items()}
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)      # 2 GiB, far past L2
    for progs, block, warps in () if a.no_stream else ((8, 32768, 16), (4, 16384, 8)):   # per free SM
        key = f"{progs}/SM,{block},{warps}w"
        rec["stream_sum"][key] = {}
        for p in free:
            run = lambda p=p: stream_sum(x, progs * p, block, warps, 1)   # noqa: E731
            rec["stream_sum"][key].update(measure(f"sum {key}", run, x.numel() * 2, [p], a.calls, a.hold_ms))
    C.write_json(C.out_path(a.out, "confined_attention"), rec)


if __name__ == "__main__":
    main()
