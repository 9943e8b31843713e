"""Does a CUDA decode attention with deep cp.async rings read ~100 GB/s per SM on a few SMs, and
does the pipelined layer beat the serial one with it?

The 0.70 bar needs decode attention beside the GEMMs on SMs of its own (docs/perf-notes.md, lead
1). The engine's Triton kernel reads 38-48 GB/s per SM when confined (session 14), and an SM
streams ~100 GB/s when its loads do not wait on math (session 13): on SM-time arithmetic, a
partition pays only with a kernel near the latter. benchmarks/cuda_decode_attention.cu is such a
kernel: each warp keeps STAGES - 1 tiles of 16 tokens in flight while it computes on the oldest.
In one process on one GPU this probe
1. checks it against the fp32 reference (and the Triton kernel's own error) on several layouts,
   lengths and grid sizes, bf16 and fp16;
2. times it on the whole GPU against the engine's Triton kernel (graph-captured);
3. confines it to P SMs with confined_attention_probe's hold kernel, per launch config (warps x
   ring stages), and reports GB/s per SM;
4. runs green_overlap_probe's pipelined layer (half A's attention beside half B's GEMMs) with it:
   GEMMs on a green context of all SMs but P plus cuBLASLt's carveout of P, attention on P SMs
   (green or primary context), against the serial layer with either kernel.

Session 17 on an H200 (results/cuda_attention-8b-h200-2026-12-01.json): the kernel equals the
Triton kernel's error in every check and reads 76 GB/s per SM on 8 free SMs, 67-69 on 33 (16
warps per SM, no ring; the Triton kernel 38-48). The pipelined layer is still x1.10-1.21 of serial
at 512 and 1024 rows: in the trace, attention runs 25% and the GEMMs 39% slower beside each other
than alone, because the half-batches re-read the weights. The engine keeps the Triton kernel.

    python3 benchmarks/cuda_attention_probe.py --out $OUT/cuda_attention.json   # GPU with nvcc, ~2 min
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks import cuda_attention as CA  # noqa: E402
from benchmarks.confined_attention_probe import confined_ms, sm_count  # noqa: E402
from benchmarks.decode_shapes import timed_ms  # noqa: E402
from benchmarks.green_overlap_probe import green_streams, wall_ms  # noqa: E402
from benchmarks.overlap_probe import Layer, blas, pipelined, serial  # noqa: E402
from replica.kernels import paged_attention as PA  # noqa: E402
from replica.kernels import reference as R  # noqa: E402
from replica.presets import PRESETS  # noqa: E402

# name -> (warps, ring stages, bulk copies); CTAs per SM: CA.ctas_per_sm (w8s3 1, w4s3 2, w6s2 2,
# w4s2 3, w8s1 2, w16s1 1)
CONFIGS = {f"w{w}s{s}{'b' if b else ''}": (w, s, b) for b in (False, True)
           for w, s in ((8, 3), (4, 3), (6, 2), (4, 2), (8, 1), (16, 1))}
CHECKS = [  # (preset, dtype, rows, max_len, programs or None): layouts of the presets the .cu takes
    ("llama-8b", torch.bfloat16, 24, 700, None), ("llama-8b", torch.float16, 24, 700, None),
    ("llama-8b", torch.bfloat16, 24, 700, 3),      # 24 warps walk every item: rings cross items
    ("qwen2-7b", torch.bfloat16, 12, 1500, None), ("qwen3-0.6b", torch.bfloat16, 12, 300, 2),
    ("llama-1b", torch.bfloat16, 64, 90, None)]


def heads(preset: str) -> tuple[int, int]:
    p = PRESETS[preset]
    return p["num_attention_heads"], p["num_key_value_heads"]


def check_case(preset: str, dtype, rows: int, max_len: int, programs, warps: int, stages: int,
               bulk: bool) -> dict:
    """Max |error| of both kernels against the fp32 reference on a random pool; lengths include
    1, 16, 17 and max_len, table rows are permuted."""
    g = torch.Generator(device="cuda").manual_seed(rows * 7 + max_len)
    h, kvh = heads(preset)
    per_row = -(-max_len // 16) + 2
    blocks = rows * per_row + 3
    k = torch.randn(blocks, kvh, 16, 128, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(blocks, kvh, 16, 128, device="cuda", dtype=dtype, generator=g)
    tables = torch.randperm(blocks, device="cuda", generator=g)[:rows * per_row].view(rows, per_row).int()
    lens = torch.randint(1, max_len + 1, (rows,), device="cuda", generator=g)
    lens[:4] = torch.tensor([1, 16, 17, max_len])
    table_rows = torch.randperm(rows, device="cuda", generator=g)
    q = torch.randn(rows, h, 128, device="cuda", dtype=dtype, generator=g)
    scale = 128 ** -0.5
    ref = R.paged_decode_attention(q.float(), k.float(), v.float(), tables, table_rows, lens, scale)
    got = CA.decode_attention(q, k, v, tables, table_rows, lens, scale, programs=programs,
                              warps=warps, stages=stages, bulk=bulk)
    tri = PA.paged_decode_attention(q, k, v, tables, table_rows, lens, scale)
    torch.cuda.synchronize()
    err, tri_err = (got.float() - ref).abs().max().item(), (tri.float() - ref).abs().max().item()
    ok = err <= max(2 * tri_err, 1e-3) and bool(torch.isfinite(got).all())
    return {"case": f"{preset}/{str(dtype)[6:]}/rows{rows}/len{max_len}/p{programs}/w{warps}s{stages}"
                    + ("b" if bulk else ""),
            "max_err": err, "triton_max_err": tri_err, "ok": ok}


def per_sm(layer: Layer, q, frees: list[int], calls: int, hold_ms: float, names: list[str]) -> dict:
    """GB/s on P free SMs (the others held), each config with occupancy x P CTAs."""
    nbytes, res = layer.kv_bytes(), {}
    for name in names:
        w, s, b = CONFIGS[name]
        res[name] = {}
        for p in frees:
            run = lambda p=p, w=w, s=s, b=b: CA.decode_attention(      # noqa: E731
                q, layer.k, layer.v, layer.tables, layer.table_rows, layer.lens, layer.hd ** -0.5,
                programs=CA.ctas_per_sm(w, s) * p, warps=w, stages=s, bulk=b)
            run()
            ms, held = confined_ms(run, p, calls, hold_ms)
            expect = 0 if p >= sm_count() else 2 * (sm_count() - p)
            res[name][p] = {"gbps": nbytes / ms / 1e6, "gbps_per_sm": nbytes / ms / 1e6 / p,
                            "valid": held == expect and (p >= sm_count() or ms * calls < 0.8 * hold_ms)}
            r = res[name][p]
            C.log(f"{name} P={p:3d}: {r['gbps']:6.0f} GB/s, {r['gbps_per_sm']:5.1f} per SM"
                  f"{'' if r['valid'] else '  (INVALID)'}")
    return res


class CudaLayer(Layer):
    """overlap_probe's layer with the CUDA kernel as its attention (knobs: programs, warps, stages)."""

    @classmethod
    def sharing(cls, layer: Layer) -> "CudaLayer":
        """A CudaLayer over `layer`'s weights and KV pool."""
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        return new

    def attend(self, q, lo: int, **knobs):
        n = q.shape[0]
        return CA.decode_attention(q, self.k, self.v, self.tables, self.table_rows[lo:lo + n],
                                   self.lens[lo:lo + n], self.hd ** -0.5, **knobs)


def overlap(p: dict, a, best: tuple[int, int], rec: dict) -> None:
    """Per-layer wall ms: serial (Triton / CUDA attention) and pipelined with green partitions."""
    w, s, b = best
    tri = Layer(p, a.rows, a.ctx, 16, "cuda", torch.bfloat16)
    cud = CudaLayer.sharing(tri)
    x = torch.randn(a.rows, p["hidden_size"], device="cuda", dtype=torch.bfloat16)
    plain = torch.cuda.Stream()
    per_layer = lambda fn, st: wall_ms(fn, st, a.repeats) / a.layers   # noqa: E731
    res = rec["ms_per_layer"] = {}
    res["serial/triton"] = per_layer(lambda: serial(tri, x, a.layers), plain)
    res["serial/cuda"] = per_layer(lambda: serial(cud, x, a.layers, warps=w, stages=s, bulk=b), plain)
    C.log(f"serial triton {res['serial/triton']:.4f}  cuda {res['serial/cuda']:.4f} ms/layer")
    for sms in [int(v) for v in a.attention_sms.split(",")]:
        knobs = dict(programs=CA.ctas_per_sm(w, s) * sms, warps=w, stages=s, bulk=b)
        for both in (False, True):
            key = f"green-gemm{'+att' if both else ''}/att{sms}/carveout"
            try:
                gemm_s, att_s = green_streams(sms, both)
                with blas("cublaslt", sms):
                    res[key] = per_layer(lambda: pipelined(cud, x, a.layers, att_s, **knobs), gemm_s)
            except Exception as e:          # recorded, not fatal
                rec.setdefault("errors", {})[key] = f"{type(e).__name__}: {str(e)[:300]}"
                C.log(f"{key} failed: {rec['errors'][key]}")
                continue
            C.log(f"{key:36s} {res[key]:.4f} ms/layer  x{res[key] / res['serial/triton']:.3f} of serial")


def overlap_graphed(p: dict, a, rec: dict) -> None:
    """Per-layer ms, graph-captured (overlap_probe's method) on plain streams of one context: the
    serial layer with either kernel, the GEMMs alone under cuBLASLt's carveout of P, and the
    pipelined layer with the CUDA kernel (--graphed-config) as a persistent grid of P SMs' worth of
    CTAs (w16s1: one CTA fills an SM's warps, so the grid holds P SMs and the GEMMs' CTAs cannot
    share them)."""
    tri = Layer(p, a.rows, a.ctx, 16, "cuda", torch.bfloat16)
    cud = CudaLayer.sharing(tri)
    x = torch.randn(a.rows, p["hidden_size"], device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    per_layer = lambda fn: timed_ms(fn, "cuda", calls=2, replays=10) / a.layers   # noqa: E731

    def gemms_only(y):
        for _ in range(a.layers):
            y = tri.post(tri.qkv(y))
        return y

    h = a.rows // 2
    qa, qb = tri.qkv(x[:h]), tri.qkv(x[h:])

    def halves_gemms(ya, yb):                  # the pipelined layer's GEMM side alone
        for _ in range(a.layers):
            ya, yb = tri.post(tri.qkv(ya)), tri.post(tri.qkv(yb))
        return ya, yb

    def halves_attention(**knobs):             # and its attention side alone
        for _ in range(a.layers):
            cud.attend(qa, 0, **knobs)
            cud.attend(qb, h, **knobs)

    res = rec["graphed_ms_per_layer"] = {}
    res["serial/triton"] = per_layer(lambda: serial(tri, x, a.layers))
    w, st, b = CONFIGS[a.graphed_config]
    config = dict(warps=w, stages=st, bulk=b, evict_first=a.evict_first)
    res["serial/cuda"] = per_layer(lambda: serial(cud, x, a.layers, **config))
    res["gemms-only"] = per_layer(lambda: gemms_only(x))
    res["halves-gemms"] = per_layer(lambda: halves_gemms(x[:h], x[h:]))
    for sms in [int(v) for v in a.attention_sms.split(",")]:
        knobs = dict(config, programs=sms * CA.ctas_per_sm(w, st))
        with blas("cublaslt", sms):
            res[f"gemms-only/carve{sms}"] = per_layer(lambda: gemms_only(x))
            res[f"halves-gemms/carve{sms}"] = per_layer(lambda: halves_gemms(x[:h], x[h:]))
            res[f"pipelined/att{sms}"] = per_layer(lambda: pipelined(cud, x, a.layers, side, **knobs))
        res[f"halves-attention/att{sms}"] = per_layer(lambda: halves_attention(**knobs))
        C.log(f"att{sms}: pipelined {res[f'pipelined/att{sms}']:.4f} ms/layer "
              f"x{res[f'pipelined/att{sms}'] / res['serial/triton']:.3f} of serial; under the carveout the "
              f"GEMMs take {res[f'gemms-only/carve{sms}']:.4f} whole, {res[f'halves-gemms/carve{sms}']:.4f} "
              f"in halves; the halves' attention on {sms} SMs {res[f'halves-attention/att{sms}']:.4f}")
    C.log(f"graphed: serial triton {res['serial/triton']:.4f}, cuda {res['serial/cuda']:.4f}, "
          f"GEMMs alone {res['gemms-only']:.4f} whole, {res['halves-gemms']:.4f} in halves (ms/layer)")


def _union(spans: list) -> list:
    out = []
    for a0, a1 in sorted(spans):
        if out and a0 <= out[-1][1]:
            out[-1][1] = max(out[-1][1], a1)
        else:
            out.append([a0, a1])
    return out


def _length(spans: list) -> float:
    return sum(b - a for a, b in spans)


def _intersection(x: list, y: list) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def trace_pipelined(p: dict, a, rec: dict) -> None:
    """One replay of the graph-captured pipelined layers under the torch profiler, per --trace-sms
    value: how long the attention and the GEMM kernels ran, and for how much of that they ran at
    the same time (us, kernel spans from CUPTI)."""
    tri = Layer(p, a.rows, a.ctx, 16, "cuda", torch.bfloat16)
    cud = CudaLayer.sharing(tri)
    x = torch.randn(a.rows, p["hidden_size"], device="cuda", dtype=torch.bfloat16)
    side, cap = torch.cuda.Stream(), torch.cuda.Stream()
    w, st, b = CONFIGS[a.graphed_config]
    out = rec["trace" + ("/evict-first" if a.evict_first else "")] = {}
    for sms in [int(v) for v in a.trace_sms.split(",")]:
        knobs = dict(programs=sms * CA.ctas_per_sm(w, st), warps=w, stages=st, bulk=b,
                     evict_first=a.evict_first)
        with blas("cublaslt", sms):
            cap.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(cap):
                pipelined(cud, x, a.layers, side, **knobs)         # compile and allocate first
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                pipelined(cud, x, a.layers, side, **knobs)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        spans = {"attention": [], "gemm": [], "other": []}
        for ev in prof.events():
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            gemm = any(k in ev.name.lower() for k in ("gemm", "sm90", "cutlass", "xmma"))
            kind = "attention" if "decode_attention" in ev.name else "gemm" if gemm else "other"
            spans[kind].append([ev.time_range.start, ev.time_range.end])
        att, gemm = _union(spans["attention"]), _union(spans["gemm"])
        every = _union(spans["attention"] + spans["gemm"] + spans["other"])
        r = out[sms] = {
            "span_us": every[-1][1] - every[0][0] if every else None,
            "attention_busy_us": _length(att), "gemm_busy_us": _length(gemm),
            "other_busy_us": _length(_union(spans["other"])), "both_busy_us": _intersection(att, gemm),
            "attention_kernels": len(spans["attention"]), "gemm_kernels": len(spans["gemm"]),
            "attention_kernel_us_mean": _length(spans["attention"]) / max(1, len(spans["attention"])),
            "gemm_kernel_us_mean": _length(spans["gemm"]) / max(1, len(spans["gemm"]))}
        C.log(f"trace att{sms}: span {r['span_us']:.0f} us, attention busy {r['attention_busy_us']:.0f}, "
              f"GEMMs busy {r['gemm_busy_us']:.0f}, both {r['both_busy_us']:.0f}, other {r['other_busy_us']:.0f}; "
              f"mean attention kernel {r['attention_kernel_us_mean']:.1f} us, GEMM {r['gemm_kernel_us_mean']:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--free", default="8,16,22,33,44,66,132")
    ap.add_argument("--attention-sms", default="16,22,28,33,44")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--hold-ms", type=float, default=200.0)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="launch configs to measure per SM")
    ap.add_argument("--graphed-config", default="w16s1", choices=sorted(CONFIGS))
    ap.add_argument("--trace-sms", default="", help="also trace the pipelined graph at these P")
    ap.add_argument("--evict-first", action="store_true", help="graphed/trace runs: K/V loads evict-first in L2")
    ap.add_argument("--skip", default="", help="comma list of: check, full, per_sm, overlap, graphed")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    rec = {"env": C.env_info("cuda"), "args": vars(a), "sms": sm_count(),
           "ptxas": {n: CA.build(torch.bfloat16, *cfg)[1].strip().splitlines()[-2:] for n, cfg in CONFIGS.items()}}
    if "check" not in skip:
        rec["checks"] = [check_case(*case, *CONFIGS[name]) for case in CHECKS for name in ("w8s3", "w8s3b")]
        rec["checks"] += [check_case("llama-8b", torch.bfloat16, 24, 700, None, *cfg) for cfg in CONFIGS.values()]
        for r in rec["checks"]:
            C.log(f"check {r['case']:44s} err {r['max_err']:.2e} (triton {r['triton_max_err']:.2e}) {'ok' if r['ok'] else 'FAIL'}")
    p = PRESETS[a.model]
    layer = Layer(p, a.rows, a.ctx, 16, "cuda", torch.bfloat16)
    q = torch.randn(a.rows, layer.h, layer.hd, device="cuda", dtype=torch.bfloat16)
    nbytes = layer.kv_bytes()
    rec["kv_bytes"] = nbytes
    if "full" not in skip:
        full = rec["full_gpu_gbps"] = {"triton": nbytes / timed_ms(lambda: layer.attend(q, 0), "cuda") / 1e6}
        for name, (w, s, b) in CONFIGS.items():
            ms = timed_ms(lambda: CA.decode_attention(q, layer.k, layer.v, layer.tables, layer.table_rows,
                                                      layer.lens, layer.hd ** -0.5, warps=w, stages=s, bulk=b),
                          "cuda")
            full[name] = nbytes / ms / 1e6
        C.log("whole GPU, GB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in full.items()))
        smids = torch.full((sm_count(),), -1, dtype=torch.int32, device="cuda")
        CA.decode_attention(q, layer.k, layer.v, layer.tables, layer.table_rows, layer.lens,
                            layer.hd ** -0.5, programs=sm_count(), smids=smids)
        rec["distinct_sms_of_132_ctas"] = int(torch.unique(smids).numel())
    frees = sorted({min(int(v), sm_count()) for v in a.free.split(",")})
    if "per_sm" not in skip:
        rec["per_sm"] = per_sm(layer, q, frees, a.calls, a.hold_ms, a.configs.split(","))
    if "overlap" not in skip:
        best = CONFIGS["w16s1"]
        if "per_sm" in rec:        # the config that reads most per SM at the smallest P measured
            name = max(rec["per_sm"], key=lambda n: rec["per_sm"][n][frees[0]]["gbps_per_sm"])
            best, rec["overlap_config"] = CONFIGS[name], name
        overlap(p, a, best, rec)
    if "graphed" not in skip:
        overlap_graphed(p, a, rec)
    if a.trace_sms:
        trace_pipelined(p, a, rec)
    C.write_json(C.out_path(a.out, "cuda_attention"), rec)


if __name__ == "__main__":
    main()
