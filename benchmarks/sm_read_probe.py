"""How fast can a few SMs read HBM? The ceiling that decides whether decode attention can overlap.

Decode attention could run beside the compute-bound GEMMs only on SMs of its own (docs/perf-notes.md,
lead 1). At the copy rate on all 132 SMs of an H200 each SM reads ~31 GB/s; attention on a third of
them would need ~75-100 GB/s per SM. Our attention loops reached 15-27 GB/s per program
(sessions 9 and 12), but they do math between loads. This probe does none: P programs each
stream a contiguous slice of a buffer far larger than L2 and sum it, with wide tiles and several
stages of loads in flight. Its best GB/s per program at small P is an upper bound for any kernel
that reads through the SM's load path (TMA aside) on that many SMs.

    python3 benchmarks/sm_read_probe.py --out $OUT/sm_read.json        # GPU, ~1 min
    TRITON_INTERPRET=1 python3 benchmarks/sm_read_probe.py --cpu-check  # the kernel's sum, on CPU
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks import roofline as RF  # noqa: E402
from benchmarks.decode_shapes import timed_ms  # noqa: E402


@triton.jit
def _stream_sum_kernel(x_ptr, out_ptr, per_program, BLOCK: tl.constexpr):
    # program p sums x[p * per_program : (p + 1) * per_program] (per_program % BLOCK == 0) into
    # out[p, :BLOCK], one BLOCK-wide tile per iteration; the loop's loads are software-pipelined
    base = tl.program_id(0).to(tl.int64) * per_program
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, per_program, BLOCK):
        acc += tl.load(x_ptr + base + i + offs).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + offs, acc)


def stream_sum(x: torch.Tensor, programs: int, block: int, num_warps: int, num_stages: int) -> torch.Tensor:
    """x [n] -> out [programs, block]: each program's slice summed tile by tile (n % (programs x
    block) elements past the last whole tile per program are not read)."""
    per_program = x.numel() // programs // block * block
    out = torch.empty(programs, block, device=x.device, dtype=torch.float32)
    _stream_sum_kernel[(programs,)](x, out, per_program, BLOCK=block, num_warps=num_warps,
                                    num_stages=num_stages)
    return out


def cpu_check() -> float:
    """Max abs error of the per-program sums against torch, fp32 on Triton's interpreter."""
    x = torch.randn(3 * 4 * 16)
    out = stream_sum(x, programs=3, block=16, num_warps=1, num_stages=1)
    ref = x.view(3, 4, 16).sum(1)
    return (out - ref).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0, help="buffer size (bf16), far past L2")
    ap.add_argument("--programs", default="8,16,33,44,66,132,264,528")
    ap.add_argument("--blocks", default="2048,8192,32768", help="bf16 elements per tile")
    ap.add_argument("--warps", default="4,8,16")
    ap.add_argument("--stages", default="1,3,5")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-check", action="store_true", help="only: the kernel against torch on Triton's "
                    "interpreter (run with TRITON_INTERPRET=1); prints the max error")
    a = ap.parse_args()
    if a.cpu_check:
        print(json.dumps({"max_abs_err": cpu_check()}))
        return
    ints = lambda s: [int(v) for v in s.split(",")]   # noqa: E731
    x = torch.randn(int(a.gib * 2**30 / 2), device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy = RF.copy_bandwidth("cuda") / 1e9
    rec = {"env": C.env_info("cuda"), "args": vars(a), "sms": sms, "copy_GBps": copy, "gbps": {}, "errors": {}}
    for p, blk, w, s in itertools.product(ints(a.programs), ints(a.blocks), ints(a.warps), ints(a.stages)):
        key = f"p{p}/b{blk}/w{w}/s{s}"
        try:
            per_program = x.numel() // p // blk * blk
            ms = timed_ms(lambda: stream_sum(x, p, blk, w, s), "cuda", calls=3, replays=5)
            rec["gbps"][key] = p * per_program * 2 / ms / 1e6
        except Exception as e:   # a config past the shared-memory limit: record it, go on
            rec["errors"][key] = f"{type(e).__name__}: {str(e)[:160]}"
    best = {}
    for p in ints(a.programs):
        runs = {k: v for k, v in rec["gbps"].items() if k.startswith(f"p{p}/")}
        if runs:
            k = max(runs, key=runs.get)
            best[p] = {"config": k, "GBps": runs[k], "per_program": runs[k] / p}
            C.log(f"P={p:4d}: best {runs[k]:7.0f} GB/s ({runs[k] / p:6.1f} per program) at {k}")
    rec["best"] = best
    C.write_json(C.out_path(a.out, "sm_read.json"), rec)


if __name__ == "__main__":
    main()
