"""Where a preset's decode step goes, kernel by kernel: the engine's ModelRunner, each row of a
bucket attending --ctx tokens through real block tables (`blas_probe.point_rows_at_blocks`), and the torch
profiler over --replays greedy graph replays per bucket. Prints and writes, per bucket, the GPU
time of a step and its kernels by total time (ms per step, launches per step).

    python3 benchmarks/graph_profile.py --out $OUT/graph_profile.json --models qwen2-0.5b,llama-1b
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks.blas_probe import point_rows_at_blocks  # noqa: E402


def kernel_table(runner, rows: int, replays: int, mode: str = "greedy") -> dict:
    for _ in range(5):
        runner.graphs.replay(rows, mode)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            runner.graphs.replay(rows, mode)
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0)
        if us:
            kernels[e.key[:90]] = (us / replays / 1000, e.count / replays)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    return dict(kernel_ms=sum(v[0] for v in kernels.values()),
                top=[dict(name=k, ms_per_step=v[0], launches_per_step=v[1]) for k, v in top])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="qwen2-0.5b,llama-1b")
    ap.add_argument("--buckets", default="1,64,512")
    ap.add_argument("--ctx", type=int, default=448)
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--modes", default="greedy", help="comma list of sampling graphs: greedy, full")
    a = ap.parse_args()
    from replica.config import EngineConfig
    from replica.model_runner import ModelRunner
    rec = dict(env=C.env_info("cuda"), ctx=a.ctx, steps={})
    for model in a.models.split(","):
        runner = ModelRunner(EngineConfig(model=f"random:{model}", max_seq_len=8192,
                                          max_num_seqs=512, kv_cache_bytes=40 * 2**30))
        for rows in map(int, a.buckets.split(",")):
            point_rows_at_blocks(runner, rows, a.ctx)
            for mode in a.modes.split(","):
                key = f"{model}@{rows}" + ("" if mode == "greedy" else f":{mode}")
                t = rec["steps"][key] = kernel_table(runner, rows, a.replays, mode)
                C.log(f"{model} {rows} rows, {mode}: {t['kernel_ms']:.3f} ms of kernels per step")
                for k in t["top"][:12]:
                    C.log(f"    {k['ms_per_step']:7.4f} ms x{k['launches_per_step']:4.0f}  {k['name']}")
            full, greedy = rec["steps"].get(f"{model}@{rows}:full"), rec["steps"].get(f"{model}@{rows}")
            if full and greedy:
                ratio = rec.setdefault("full_over_greedy", {})[f"{model}@{rows}"] = \
                    full["kernel_ms"] / greedy["kernel_ms"]
                C.log(f"{model} {rows} rows: full sampling x{ratio:.2f} of the greedy step")
        del runner
        torch.cuda.empty_cache()
    C.write_json(a.out, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
