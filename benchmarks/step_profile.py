"""Where a loaded engine's steps go: GPU time by kernel kind, GPU idle gaps, host time by phase.

engine_capacity says how far a burst is from its roofline; this says where the gap is. It builds
the engine as a replica does (`EngineCore`: sizing, ladder, graphs), submits engine_capacity's
seeded burst and steps it by hand. For a window of mixed steps and one of full-width decode
steps it reports:
- unprofiled: wall time per step and host time per phase (schedule, launch, collect: the host
  waiting for the GPU, postprocess), with a cProfile of `launch`, and the allocator's
  cudaMalloc/cudaFree counts;
- under the torch profiler (CUPTI): GPU kernel time per step by kind (gemm, attention,
  elementwise, other), the top kernels, the host ops' self time, and the GPU's idle time
  between kernels with its largest gaps and the kernels around them.

It also times a few mixed steps launched on an idle GPU (their host time alone) and one
F.linear's host time at a fixed row count against a new row count per call.

`--first-call-syncs` instead builds the engine and checks, for every GEMM shape an eager mixed
step can run, whether its first call waits for the device (cuBLAS loading a kernel: it stalls
the whole step queue). `--gemm-sweep` also times the model's four projection GEMMs at every
token count from `--sweep-lo` to `--sweep-hi` in steps of `--sweep-step`, each against the same
GEMM with its row count padded up to a multiple of 128 (cuBLAS picks a kernel per shape).

    python3 benchmarks/step_profile.py --model llama-8b --out $OUT/step_profile.json   # GPU, ~30 s
    python3 benchmarks/step_profile.py --model tiny --device cpu --burst 24 --lo 8 --hi 16           # CPU smoke
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import io
import pstats
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks import roofline as RF  # noqa: E402
from benchmarks.decode_shapes import timed_ms  # noqa: E402
from benchmarks.engine_capacity import burst_requests  # noqa: E402

from replica import EngineConfig, SamplingParams  # noqa: E402
from replica.presets import PRESETS  # noqa: E402
from replica.sequence import Sequence  # noqa: E402
from replica.worker import EngineCore  # noqa: E402

KINDS = (("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "sm100")),
         ("attention", ("decode_split", "decode_combine", "prefill_kernel", "prefill_merge", "attention")),
         ("elementwise", ("rms_norm", "silu_mul", "rope_store", "elementwise", "index", "copy", "fill",
                          "reduce", "argmax", "cat", "gather", "scatter")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def host_launch_probe(device: str, hidden: int = 4096, out: int = 28672, calls: int = 40) -> dict:
    """Host microseconds of one F.linear launch with the GPU idle (synchronized first), at a fixed
    row count and at a new row count every call (an eager mixed step's token count changes every
    step): what the host pays per GEMM before the kernel is queued."""
    if device != "cuda":
        return {}
    w = torch.randn(out, hidden, device=device, dtype=torch.bfloat16)
    x = torch.randn(4096, hidden, device=device, dtype=torch.bfloat16)
    res = {}
    for label, rows in (("fixed_rows", [2560] * calls), ("new_rows_each_call", [2000 + 7 * i for i in range(calls)]),
                        ("rows_multiple_of_64", [2048 + 64 * (i % 8) for i in range(calls)])):
        F.linear(x[:rows[0]], w)
        ts = []
        for m in rows:
            torch.cuda.synchronize()
            t = time.perf_counter()
            F.linear(x[:m], w)
            ts.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        res[label] = {"median_us": sorted(ts)[len(ts) // 2] * 1e6, "max_us": max(ts) * 1e6,
                      "first_us": ts[0] * 1e6}
    return res


def first_call_syncs(core: EngineCore, busy_ms: float = 20.0) -> dict:
    """After startup, the first call of each GEMM an eager mixed step can run
    (`ModelRunner.eager_gemms`) with `busy_ms` of work queued ahead of it: a call whose host time
    reaches into that work waited for the device (a sync inside cuBLAS, e.g. loading a kernel)."""
    r = core.runner
    calls = r.eager_gemms()
    x = r.gemm_inputs(calls)
    cycles = int(busy_ms * 1e-3 * torch.cuda.get_device_properties(r.device).clock_rate * 1e3)
    synced = collections.Counter()
    examples = []
    with torch.inference_mode():
        for name, w, bias, rows in calls:
            torch.cuda.synchronize()
            torch.cuda._sleep(cycles)
            t = time.perf_counter()
            F.linear(x[w.shape[1]][:rows], w, bias)
            host_ms = (time.perf_counter() - t) * 1e3
            if host_ms > busy_ms / 4:
                synced[name] += 1
                examples.append((name, rows, round(host_ms, 1)))
        torch.cuda.synchronize()
    top_rows = {name: max(rows for n, rows, _ in examples if n == name) for name in synced}
    return {"calls": len(calls), "synced": dict(synced), "synced_rows_max": top_rows,
            "examples": examples[:20]}


def timed_steps(core: EngineCore, steps: int, device: str, sync_first: bool = False) -> dict:
    """Run `steps` engine steps without the profiler; wall and host time per step by phase
    (`collect` is the host waiting for the step before: the GPU is ahead when it is large)."""
    phases = collections.Counter()
    targets = {"schedule": core.scheduler, "launch": core.runner, "collect": core.runner,
               "postprocess": core.scheduler}
    originals = {name: getattr(obj, name) for name, obj in targets.items()}

    launch_profile = cProfile.Profile()

    def timed(name, fn):
        def wrapper(*args, **kw):
            if sync_first and name == "launch":
                C.sync(device)                 # the GPU idle: launch's own host time, no queue waits
            t = time.perf_counter()
            if name == "launch":
                launch_profile.enable()
            try:
                return fn(*args, **kw)
            finally:
                if name == "launch":
                    launch_profile.disable()
                phases[name] += time.perf_counter() - t
        return wrapper
    for name, obj in targets.items():
        setattr(obj, name, timed(name, originals[name]))
    alloc0 = allocator_counts(device)
    try:
        mixed0 = core.tokens["mixed_steps"]
        t0 = time.perf_counter()
        for _ in range(steps):
            core.step()
        C.sync(device)
        wall = time.perf_counter() - t0
    finally:
        for name, obj in targets.items():
            delattr(obj, name)                 # the instance attribute goes; the method is back
    n = max(1, steps)
    alloc1 = allocator_counts(device)
    text = io.StringIO()
    if launch_profile.getstats():
        pstats.Stats(launch_profile, stream=text).sort_stats("tottime").print_stats(12)
    return {"steps": steps, "mixed_steps": core.tokens["mixed_steps"] - mixed0, "wall_ms_per_step": wall / n * 1e3,
            "host_ms_per_step": {k: v / n * 1e3 for k, v in phases.items()},
            "allocator_calls": {k: alloc1[k] - alloc0.get(k, 0) for k in alloc1},
            "launch_cprofile_top": text.getvalue().splitlines()[-20:]}


def allocator_counts(device: str) -> dict:
    """CUDA caching allocator and pinned host allocator counters (cudaMalloc/cudaFree and retries
    synchronize the device: a step that makes them waits for the one before)."""
    if device != "cuda":
        return {}
    dev = torch.cuda.memory_stats()
    out = {k: dev.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                       "num_sync_all_streams")}
    host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    out.update({f"host_{k}": host.get(k, 0) for k in ("num_host_alloc", "num_host_free")})
    return out


def kernel_gaps(kernels: list, top: int = 6) -> dict:
    """Idle time between consecutive kernels (start-sorted, [start_us, end_us, name]) and the
    largest gaps with their neighbours: where the GPU waited for the host."""
    kernels.sort()
    gaps, idle, end = [], 0.0, None
    for start, stop, name in kernels:
        if end is not None and start > end[0]:
            idle += start - end[0]
            gaps.append((start - end[0], end[1][:60], name[:60]))
        if end is None or stop > end[0]:
            end = (stop, name)
    gaps.sort(reverse=True)
    return {"idle_ms": idle / 1e3, "span_ms": (kernels[-1][1] - kernels[0][0]) / 1e3 if kernels else 0.0,
            "gaps_over_50us": sum(1 for g in gaps if g[0] > 50),
            "largest": [{"us": g[0], "after": g[1], "before": g[2]} for g in gaps[:top]]}


def profile_steps(core: EngineCore, steps: int, device: str) -> dict:
    """Run `steps` engine steps under the profiler; kernel time by kind and the top kernels."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    kinds = collections.Counter()
    mixed0, decode0 = core.tokens["mixed_steps"], sum(core.steps.values())
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            core.step()
        C.sync(device)
        wall = time.perf_counter() - t0
    per_kernel = collections.Counter()
    counts = collections.Counter()
    spans = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            per_kernel[ev.name] += us
            counts[ev.name] += 1
            spans.append([ev.time_range.start, ev.time_range.end, ev.name])
    for name, us in per_kernel.items():
        kinds[kernel_kind(name)] += us
    host_self = collections.Counter()
    for ev in prof.key_averages():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            host_self[ev.key] += ev.self_cpu_time_total
    n = max(1, steps)
    return {"steps": steps, "mixed_steps": core.tokens["mixed_steps"] - mixed0,
            "decode_steps": sum(core.steps.values()) - decode0,
            "wall_ms_per_step": wall / n * 1e3,
            "gpu_ms_per_step": {k: us / n / 1e3 for k, us in sorted(kinds.items())},
            "gpu_busy_fraction": sum(kinds.values()) / 1e6 / wall if wall else None,
            "gaps": kernel_gaps(spans) if spans else None,
            "top_kernels": [{"name": name[:120], "ms_per_step": us / n / 1e3, "calls_per_step": counts[name] / n}
                            for name, us in per_kernel.most_common(15)],
            "top_host_self_ms_per_step": {name[:80]: us / n / 1e3 for name, us in host_self.most_common(15)}}


def run_burst(a) -> dict:
    core = EngineCore(EngineConfig(model=f"random:{a.model}", device=a.device, max_seq_len=a.max_seq_len))
    reqs = burst_requests(a.burst, a.lo, a.hi, a.seed)
    for i, (prompt, out) in enumerate(reqs):
        core.scheduler.submit(Sequence(f"r{i}", prompt, SamplingParams(max_tokens=out, temperature=0.0,
                                                                       ignore_eos=True), i))
    rec = {"requests": len(reqs), "prompt_tokens": sum(len(p) for p, _ in reqs),
           "output_tokens": sum(o for _, o in reqs), "buckets": list(core.runner.plan.buckets),
           "step_token_budget": core.runner.step_token_budget}
    C.sync(a.device)
    t0 = time.perf_counter()
    for _ in range(a.skip):                               # let the first mixed steps settle
        core.step()
    rec["mixed_launch_gpu_idle"] = timed_steps(core, 4, a.device, sync_first=True)
    rec["mixed_unprofiled"] = timed_steps(core, a.window, a.device)
    rec["mixed_window"] = profile_steps(core, a.window, a.device)
    while core.scheduler.waiting or any(s.num_computed < len(s.prompt_ids)
                                        for s in core.scheduler.running.values()):
        core.step()                                       # finish admitting: decode at full width next
    for _ in range(3):
        core.step()
    rec["decode_unprofiled"] = timed_steps(core, a.window, a.device)
    rec["decode_window"] = profile_steps(core, a.window, a.device)
    while core.has_work():
        core.step()
    C.sync(a.device)
    rec["burst_wall_s"] = time.perf_counter() - t0
    rec["mixed_steps"] = core.tokens["mixed_steps"]
    rec["decode_steps"] = sum(core.steps.values())
    return rec


def gemm_sweep(a, gemm_tflops: float) -> list[dict]:
    p = PRESETS[a.model]
    d, inter, h, kvh = p["hidden_size"], p["intermediate_size"], p["num_attention_heads"], p["num_key_value_heads"]
    hd = d // h
    dt = torch.bfloat16 if a.device == "cuda" else torch.float32
    shapes = {"wqkv": ((h + 2 * kvh) * hd, d), "wo": (d, h * hd), "w13": (2 * inter, d), "w2": (d, inter)}
    weights = {k: torch.randn(o, i, device=a.device, dtype=dt) * 0.02 for k, (o, i) in shapes.items()}
    biggest = -(-a.sweep_hi // 128) * 128
    xs = {i: torch.randn(biggest, i, device=a.device, dtype=dt) for i in {d, h * hd, inter}}
    rows = []
    for m in range(a.sweep_lo, a.sweep_hi + 1, a.sweep_step):
        padded = -(-m // 128) * 128
        flop = sum(2 * m * o * i for o, i in shapes.values())
        ms = sum(timed_ms(lambda w=w, x=xs[w.shape[1]]: F.linear(x[:m], w), a.device, calls=4, replays=5)
                 for w in weights.values())
        ms_pad = sum(timed_ms(lambda w=w, x=xs[w.shape[1]]: F.linear(x[:padded], w), a.device, calls=4, replays=5)
                     for w in weights.values()) if padded != m else ms
        rows.append({"tokens": m, "ms": ms, "tflops": flop / ms / 1e9, "padded": padded, "padded_ms": ms_pad,
                     "of_gemm_rate": flop / ms / 1e9 / gemm_tflops if gemm_tflops else None})
    return rows


def _phases(ms: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in ms.items())


def print_burst(burst: dict) -> None:
    """The windows' kernel split, idle gaps and host phases, one block per window."""
    for w in ("mixed_window", "decode_window"):
        r, u = burst[w], burst[w.replace("window", "unprofiled")]
        C.log(f"{w}: {r['mixed_steps']} mixed + {r['decode_steps']} decode steps, wall "
              f"{r['wall_ms_per_step']:.2f} ms/step, GPU {_phases(r['gpu_ms_per_step'])}")
        for k in r["top_kernels"][:8]:
            C.log(f"   {k['ms_per_step']:7.3f} ms x{k['calls_per_step']:.0f}  {k['name']}")
        C.log("   host self time: " + _phases(dict(list(r["top_host_self_ms_per_step"].items())[:10])))
        g = r["gaps"] or {}
        C.log(f"   GPU idle {g.get('idle_ms', 0) / max(1, r['steps']):.2f} ms/step; largest gaps: "
              + "; ".join(f"{x['us']:.0f} us after {x['after']}" for x in g.get("largest", [])[:4]))
        C.log(f"   unprofiled: {u['mixed_steps']} mixed of {u['steps']}, wall {u['wall_ms_per_step']:.2f} "
              f"ms/step, host {_phases(u['host_ms_per_step'])}; allocator {u['allocator_calls']}")
        for line in u["launch_cprofile_top"]:
            C.log("     " + line)
    g = burst["mixed_launch_gpu_idle"]
    C.log("mixed steps launched on an idle GPU: host " + _phases(g["host_ms_per_step"]))
    for line in g["launch_cprofile_top"]:
        C.log("     " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-seq-len", type=int, default=8192)
    ap.add_argument("--burst", type=int, default=500)
    ap.add_argument("--lo", type=int, default=200)
    ap.add_argument("--hi", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", type=int, default=8, help="steps before the mixed window")
    ap.add_argument("--window", type=int, default=12, help="steps per profiled window")
    ap.add_argument("--gemm-sweep", action="store_true")
    ap.add_argument("--first-call-syncs", action="store_true",
                    help="only: build the engine, then find the eager GEMM shapes whose first call waits for the device")
    ap.add_argument("--sweep-lo", type=int, default=1800)
    ap.add_argument("--sweep-hi", type=int, default=2700)
    ap.add_argument("--sweep-step", type=int, default=13)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rec = {"env": C.env_info(a.device), "args": vars(a)}
    rec["gemm_TFLOPs"] = gemm = RF.gemm_rate(a.device) / 1e12 if a.device == "cuda" else None
    if a.first_call_syncs:
        core = EngineCore(EngineConfig(model=f"random:{a.model}", device=a.device, max_seq_len=a.max_seq_len))
        rec["startup"] = dataclasses.asdict(core.runner.startup)     # warmup_seconds: what warming costs
        rec["first_call_syncs"] = first_call_syncs(core)
        C.log(f"first calls that waited for the device: {rec['first_call_syncs']}")
        C.write_json(C.out_path(a.out, "step_profile"), rec)
        return
    rec["burst"] = run_burst(a)
    print_burst(rec["burst"])
    rec["linear_host_us"] = host_launch_probe(a.device)
    C.log(f"F.linear host time per launch: {rec['linear_host_us']}")
    if a.gemm_sweep:
        rec["gemm_sweep"] = gemm_sweep(a, gemm or 0.0)
        for r in rec["gemm_sweep"]:
            C.log(f"tokens {r['tokens']:5d}: {r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s; padded to {r['padded']}: "
                  f"{r['padded_ms']:.3f} ms")
    C.write_json(C.out_path(a.out, "step_profile"), rec)


if __name__ == "__main__":
    main()
