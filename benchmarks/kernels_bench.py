"""Decode-kernel micro-benchmark: Triton vs reference, correctness then timing.

    python benchmarks/kernels_bench.py                 # CUDA: llama-8b shapes, B in 1/8/32/64
    python benchmarks/kernels_bench.py --sweep         # + attention tuning sweep (split, tiles, warps)
    python benchmarks/kernels_bench.py --tiny          # tiny shapes, correctness only (CPU: re-execs
                                                       #   itself under TRITON_INTERPRET=1)

Per op and case: rel. error of the Triton kernel vs the reference on the same inputs, then the
median time per call of each, measured by replaying a CUDA graph of CALLS back-to-back calls with
CUDA events (warm-up and capture first; an op that fails to capture is timed eagerly, path
"eager"), and achieved GB/s (bytes that must move / time). Attention rotates over distinct KV slot
sets inside the graph so its K/V comes from HBM, not L2, as in a real decode step. Writes JSON to
$OUT/kernels.json when OUT is set. Exit status 1 if any rel. error exceeds its tolerance.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CALLS = 10       # calls per captured graph
REPLAYS = 30     # timed graph replays (median taken)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Shapes:
    name: str
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int


LLAMA_8B = Shapes("llama-8b", 4096, 14336, 32, 8, 128)
TINY = Shapes("tiny", 64, 128, 4, 2, 16)
# (batch, context, cache max length L)
CASES_8B = [(1, 640, 2048), (8, 640, 2048), (32, 640, 2048), (64, 640, 2048), (8, 4096, 4096)]
CASES_TINY = [(1, 40, 256), (3, 40, 64), (3, 200, 256)]  # direct and split attention


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def time_us(fn, device, calls: int = CALLS) -> tuple[float, str]:
    """Median microseconds per call of `fn(i)` (i = call index), graph-replayed when possible."""
    if device.type != "cuda":
        return math.nan, "none"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles here, never inside the capture)
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    path = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(i)
        run = graph.replay
    except Exception as e:  # not capturable: report it and time eagerly
        print(f"  capture failed ({type(e).__name__}: {str(e)[:120]}); timing eagerly")
        torch.cuda.synchronize()
        path = "eager"

        def run():
            for i in range(calls):
                fn(i)
    for _ in range(3):
        run()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return statistics.median(times), path


def make_inputs(sh: Shapes, batch: int, ctx: int, max_len: int, dtype, device, rotations: int):
    g = torch.Generator(device="cpu").manual_seed(batch * 7919 + ctx)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    hd, h, kvh = sh.head_dim, sh.heads, sh.kv_heads
    slots_total = batch * rotations + 1  # +1: a never-used scratch slot, as in the engine
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None, :]
    slot_sets = torch.randperm(slots_total - 1, generator=g).view(rotations, batch).to(device)
    return dict(
        x=rnd(batch, sh.hidden), residual=rnd(batch, sh.hidden), w=rnd(sh.hidden),
        gate_up=rnd(batch, 2 * sh.inter), qkv=rnd(batch, (h + 2 * kvh) * hd),
        cos=ang.cos().float().to(device), sin=ang.sin().float().to(device),
        q=rnd(batch, h, hd),
        k_cache=(0.5 * torch.randn(slots_total, kvh, max_len, hd, device=device)).to(dtype),
        v_cache=torch.randn(slots_total, kvh, max_len, hd, device=device).to(dtype),
        slot_sets=slot_sets,                                    # [rotations, B]
        positions=torch.full((batch,), ctx - 1, dtype=torch.int64, device=device),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int64, device=device))


def op_table(sh: Shapes, inp: dict, impl, eps=1e-5):
    """name -> (fn(i) -> output tensor, bytes moved per call)."""
    e = inp["x"].element_size()
    b, hd, h, kvh = inp["x"].shape[0], sh.head_dim, sh.heads, sh.kv_heads
    rot = inp["slot_sets"].shape[0]
    qkv_cols = (h + 2 * kvh) * hd
    ctx = int(inp["seq_lens"][0])
    return {
        "rms_norm": (lambda i: impl.rms_norm(inp["x"], inp["w"], eps),
                     (2 * b + 1) * sh.hidden * e),
        "add_rms_norm": (lambda i: impl.add_rms_norm(inp["x"], inp["residual"], inp["w"], eps)[0],
                         (4 * b + 1) * sh.hidden * e),
        "silu_mul": (lambda i: impl.silu_mul(inp["gate_up"]), 3 * b * sh.inter * e),
        "rope_store_kv": (lambda i: impl.rope_store_kv(
            inp["qkv"], inp["cos"], inp["sin"], inp["positions"], inp["slot_sets"][i % rot],
            inp["k_cache"], inp["v_cache"], h, kvh), 2 * b * qkv_cols * e + 4 * b * hd),
        "decode_attention": (lambda i: impl.decode_attention(
            inp["q"], inp["k_cache"], inp["v_cache"], inp["slot_sets"][i % rot], inp["seq_lens"],
            1.0 / math.sqrt(hd)), b * (ctx * kvh * hd * 2 + 2 * h * hd) * e),
    }


def bench_case(sh, batch, ctx, max_len, dtype, device, triton_impl, ref_impl, timing):
    kv_bytes = batch * ctx * sh.kv_heads * sh.head_dim * 2 * torch.finfo(dtype).bits // 8
    # Attention reads a fresh slot set on each call of a graph, > 120 MB in all (L2 is 50 MB).
    rotations = max(1, min(64, math.ceil(120e6 / kv_bytes))) if timing else 1
    calls = max(CALLS, rotations)
    inp = make_inputs(sh, batch, ctx, max_len, dtype, device, rotations)
    rows = []
    for name, (fn_tri, nbytes) in op_table(sh, inp, triton_impl).items():
        fn_ref = op_table(sh, inp, ref_impl)[name][0]
        res0 = inp["residual"].clone()
        out_ref = fn_ref(0).clone()
        inp["residual"].copy_(res0)  # add_rms_norm updates it in place
        out_tri = fn_tri(0).clone()
        inp["residual"].copy_(res0)
        err = rel_err(out_tri, out_ref)
        row = dict(shapes=sh.name, op=name, batch=batch, ctx=ctx, max_len=max_len,
                   dtype=str(dtype).replace("torch.", ""), rel_err=err, ok=err <= TOL[dtype])
        if timing:
            t_tri, path_tri = time_us(fn_tri, device, calls)
            t_ref, path_ref = time_us(fn_ref, device, calls)
            inp["residual"].copy_(res0)
            row.update(triton_us=t_tri, ref_us=t_ref, path_triton=path_tri, path_ref=path_ref,
                       speedup=t_ref / t_tri, triton_gbs=nbytes / t_tri / 1e3,
                       ref_gbs=nbytes / t_ref / 1e3, bytes=nbytes)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows, inp


def sweep_attention(sh, inp, dtype, device, attention_mod):
    """Time decode_attention over tuning knobs on one case's inputs; returns rows sorted by time."""
    b, h, hd = inp["q"].shape
    max_len, ctx = inp["k_cache"].shape[2], int(inp["seq_lens"][0])
    rot = inp["slot_sets"].shape[0]
    nbytes = b * (ctx * sh.kv_heads * hd * 2 + 2 * h * hd) * inp["q"].element_size()
    out = []
    for split in (32, 64, 128, 256, 512):
        for block_n, warps, stages in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 8, 2)):
            if split % block_n or split > max(max_len, block_n):
                continue
            kw = dict(split=split, block_n=block_n, num_warps=warps, num_stages=stages)
            fn = lambda i: attention_mod.decode_attention(  # noqa: E731
                inp["q"], inp["k_cache"], inp["v_cache"], inp["slot_sets"][i % rot],
                inp["seq_lens"], 1.0 / math.sqrt(hd), **kw)
            try:
                t, _ = time_us(fn, device, max(CALLS, rot))
            except Exception as e:  # e.g. out of shared memory for a config
                print(f"  sweep {kw}: {type(e).__name__}")
                continue
            out.append(dict(batch=b, ctx=ctx, max_len=max_len, us=t, gbs=nbytes / t / 1e3, **kw))
    out.sort(key=lambda r: r["us"])
    for r in out[:3]:
        print(f"  sweep B={b} ctx={ctx} L={max_len}: {r['us']:8.2f} us {r['gbs']:7.1f} GB/s  "
              f"split={r['split']} block_n={r['block_n']} warps={r['num_warps']} "
              f"stages={r['num_stages']}")
    return out


def format_row(r: dict) -> str:
    head = f"{r['op']:<17} B={r['batch']:<3} ctx={r['ctx']:<5} L={r['max_len']:<5}"
    err = f"err={r['rel_err']:.1e}{'' if r['ok'] else ' FAIL'}"
    if "triton_us" not in r:
        return f"{head} {err}"
    return (f"{head} triton {r['triton_us']:8.2f} us ({r['triton_gbs']:7.1f} GB/s)  ref "
            f"{r['ref_us']:8.2f} us  x{r['speedup']:5.2f}  {r['path_triton']}/{r['path_ref']}  {err}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, correctness only")
    ap.add_argument("--sweep", action="store_true", help="also sweep attention tuning knobs")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton imports
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    import triton

    import replica.kernels.reference as ref_impl
    from replica.kernels import attention, fused

    class TritonImpl:  # the Triton wrappers, called directly (the dispatcher picks ref on CPU)
        rms_norm, add_rms_norm, silu_mul = fused.rms_norm, fused.add_rms_norm, fused.silu_mul
        rope_store_kv, decode_attention = fused.rope_store_kv, attention.decode_attention

    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.tiny or not cuda
    dtype = getattr(torch, args.dtype) if cuda else torch.float32  # interpreter: no bf16 tl.dot
    sh, cases = (TINY, CASES_TINY) if tiny else (LLAMA_8B, CASES_8B)
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  "
          f"{sh.name} {str(dtype)[6:]}  timing={'on' if not tiny else 'off'}")
    checks = {}
    if cuda:  # the small-shape Triton-vs-reference checks (poisoned outputs, cache writes) first
        from replica.kernels import selfcheck
        checks = selfcheck.run("cuda", dtype)
        failed = {k: v for k, v in checks.items() if v != "ok"}
        print(f"selfcheck: {len(checks) - len(failed)}/{len(checks)} ok  {failed or ''}")
    rows, sweeps = [], []
    for batch, ctx, max_len in cases:
        case_rows, inp = bench_case(sh, batch, ctx, max_len, dtype, device, TritonImpl, ref_impl,
                                    timing=not tiny)
        rows += case_rows
        if args.sweep and not tiny:
            sweeps += sweep_attention(sh, inp, dtype, device, attention)
        del inp
        if cuda:
            torch.cuda.empty_cache()
    result = dict(device=name, torch=torch.__version__, triton=triton.__version__, shapes=sh.name,
                  dtype=str(dtype)[6:], calls_per_graph=CALLS, replays=REPLAYS, rows=rows,
                  selfcheck=checks, attention_sweep=sweeps)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "kernels.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    bad = [r for r in rows if not r["ok"]] + [k for k, v in checks.items() if v != "ok"]
    print(f"{len(rows) - len(bad)}/{len(rows)} correctness checks ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
