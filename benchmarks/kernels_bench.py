"""Decode-kernel micro-benchmark: Triton vs reference, correctness then timing.

    python benchmarks/kernels_bench.py                 # CUDA: llama-8b shapes, B in 1/8/32/64
    python benchmarks/kernels_bench.py --sweep         # + paged decode split and prefill sweeps
    python benchmarks/kernels_bench.py --tiny          # tiny shapes, correctness only (CPU: re-execs
                                                       #   itself under TRITON_INTERPRET=1)
    python benchmarks/kernels_bench.py --paged-only    # only the paged-KV ops (and their sweeps)

Per op and case: rel. error of the Triton kernel vs the reference on the same inputs, then the
median time per call of each, measured by replaying a CUDA graph of CALLS back-to-back calls with
CUDA events (warm-up and capture first; an op that fails to capture is timed eagerly, path
"eager"), and achieved GB/s (bytes that must move / time). Writes JSON to
$OUT/kernels.json when OUT is set. Exit status 1 if any rel. error exceeds its tolerance.

Paged-KV ops (block size BS = 16, shuffled block ids as in a fragmented pool, table width
max_len / BS): `rope_store_kv_paged` and `paged_decode_attention` per decode case (attention rotates
over distinct block tables), `paged_prefill_attention` per packed-step case of PREFILL_CASES_*
(timed the same way; TFLOP/s counts the causal score + PV work). `--sweep` adds the paged decode
split sweep (rows at several contexts against one max_len, where the split choice matters) and a
prefill stages/warps sweep. On CUDA the run ends with the paged decode kernel's specialisation
count over the engine's bucket ladder 1..512 (the JIT caches of `_decode_split_kernel` and the
two combine kernels, `_decode_combine_kernel` below B x H = 4096, `_decode_combine_rows_kernel`
from it), which must be 1 + 1 + 1. `--combine-sweep` times the combine's two grids alone. The sweeps and the JIT accounting live in
benchmarks/kernels_sweeps.py.
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
QWEN2_05B = Shapes("qwen2-0.5b", 896, 4864, 14, 2, 64)
# head layouts of the other presets, for the split sweep (hidden and inter unused there)
LLAMA_1B = Shapes("llama-1b", 2048, 8192, 32, 8, 64)
QWEN3_06B = Shapes("qwen3-0.6b", 1024, 3072, 16, 8, 128)
QWEN2_7B = Shapes("qwen2-7b", 3584, 18944, 28, 4, 128)
SPLIT_SWEEP_LAYOUTS = (LLAMA_8B, QWEN2_05B, LLAMA_1B, QWEN3_06B, QWEN2_7B)
TINY = Shapes("tiny", 64, 128, 4, 2, 16)
# (batch, context, cache max length L)
CASES_8B = [(1, 640, 2048), (8, 640, 2048), (32, 640, 2048), (64, 640, 2048), (8, 4096, 4096)]
CASES_TINY = [(1, 40, 256), (3, 40, 64), (3, 200, 256)]  # direct and split attention
BLOCK_SIZE = 16  # paged KV block (the engine default)
# packed prefill steps: name -> [(q_len, cached prefix)]; decode rows are (1, context - 1)
PREFILL_CASES_8B = {
    "1x2048": [(2048, 0)],
    "4x512+200dec": [(512, 0)] * 4 + [(1, 1023)] * 200,
    "128+32k_prefix": [(128, 32640)],
    "2048+30k_prefix": [(2048, 30720)],
    "256dec_ctx2k": [(1, 2047)] * 256,
}
PREFILL_CASES_TINY = {"mixed": [(37, 0), (1, 40), (5, 16), (1, 0)], "one": [(70, 30)]}
LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)


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
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv[None, :]
    return dict(
        x=rnd(batch, sh.hidden), residual=rnd(batch, sh.hidden), w=rnd(sh.hidden),
        gate_up=rnd(batch, 2 * sh.inter), qkv=rnd(batch, (h + 2 * kvh) * hd),
        cos=ang.cos().float().to(device), sin=ang.sin().float().to(device),
        q=rnd(batch, h, hd),
        positions=torch.full((batch,), ctx - 1, dtype=torch.int64, device=device),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int64, device=device))


def op_table(sh: Shapes, inp: dict, impl, eps=1e-5):
    """name -> (fn(i) -> output tensor, bytes moved per call)."""
    e = inp["x"].element_size()
    b = inp["x"].shape[0]
    return {
        "rms_norm": (lambda i: impl.rms_norm(inp["x"], inp["w"], eps),
                     (2 * b + 1) * sh.hidden * e),
        "add_rms_norm": (lambda i: impl.add_rms_norm(inp["x"], inp["residual"], inp["w"], eps)[0],
                         (4 * b + 1) * sh.hidden * e),
        "silu_mul": (lambda i: impl.silu_mul(inp["gate_up"]), 3 * b * sh.inter * e),
    }


def paged_pool(g, sh: Shapes, seqs: int, blocks_per_seq: int, dtype, device):
    """Caches [1 + seqs * blocks_per_seq, KVH, BS, hd] (block 0: scratch) and the shuffled block
    ids of each sequence [seqs, blocks_per_seq] (a fragmented pool, not contiguous runs)."""
    nb = 1 + seqs * blocks_per_seq
    shape = (nb, sh.kv_heads, BLOCK_SIZE, sh.head_dim)
    k = (0.5 * torch.randn(shape, device=device)).to(dtype)
    v = torch.randn(shape, device=device).to(dtype)
    ids = (1 + torch.randperm(nb - 1, generator=g)).view(seqs, blocks_per_seq)
    return k, v, ids


def make_paged_inputs(sh: Shapes, batch: int, ctx: int, max_len: int, dtype, device,
                      rotations: int):
    g = torch.Generator(device="cpu").manual_seed(batch * 7907 + ctx)
    max_blocks = max_len // BLOCK_SIZE
    used = -(-ctx // BLOCK_SIZE)
    k, v, ids = paged_pool(g, sh, batch * rotations, used, dtype, device)
    tables = torch.zeros(rotations, batch, max_blocks, dtype=torch.int32)
    tables[:, :, :used] = ids.view(rotations, batch, used)           # rest: scratch block 0
    # decode writes position ctx - 1 of each row (of the first rotation's tables)
    slots = tables[0, :, (ctx - 1) // BLOCK_SIZE].long() * BLOCK_SIZE + (ctx - 1) % BLOCK_SIZE
    return dict(pk_cache=k, pv_cache=v, tables=tables.to(device),  # [rotations, B, max_blocks]
                table_rows=torch.arange(batch, device=device), slot_mapping=slots.to(device))


def paged_op_table(sh: Shapes, inp: dict, impl):
    """Paged decode ops: name -> (fn(i), bytes moved per call)."""
    e = inp["x"].element_size()
    b, hd, h, kvh = inp["x"].shape[0], sh.head_dim, sh.heads, sh.kv_heads
    rot = inp["tables"].shape[0]
    ctx = int(inp["seq_lens"][0])
    return {
        "rope_store_kv_paged": (lambda i: impl.rope_store_kv_paged(
            inp["qkv"], inp["cos"], inp["sin"], inp["positions"], inp["slot_mapping"],
            inp["pk_cache"], inp["pv_cache"], h, kvh), 2 * b * (h + 2 * kvh) * hd * e + 4 * b * hd),
        "paged_decode_attention": (lambda i: impl.paged_decode_attention(
            inp["q"], inp["pk_cache"], inp["pv_cache"], inp["tables"][i % rot], inp["table_rows"],
            inp["seq_lens"], 1.0 / math.sqrt(hd)), b * (ctx * kvh * hd * 2 + 2 * h * hd) * e),
    }


def prefill_inputs(sh: Shapes, chunks, dtype, device, meta_cls):
    """One packed step: q [T, H, hd], a pool holding every chunk's kv_len tokens, its table and
    PrefillMeta. Returns (inputs, bytes that must move, FLOPs of the causal attention)."""
    g = torch.Generator(device="cpu").manual_seed(len(chunks) * 31 + chunks[0][0])
    q_lens = [ql for ql, _ in chunks]
    kv_lens = [ql + pre for ql, pre in chunks]
    max_blocks = -(-max(kv_lens) // BLOCK_SIZE)
    k, v, ids = paged_pool(g, sh, len(chunks), max_blocks, dtype, device)
    meta = meta_cls.build(q_lens, kv_lens, list(range(len(chunks))), device)
    q = torch.randn(sum(q_lens), sh.heads, sh.head_dim, generator=g).to(device, dtype)
    e, hd, kvh = q.element_size(), sh.head_dim, sh.kv_heads
    nbytes = 2 * q.numel() * e + sum(kv_lens) * kvh * hd * 2 * e
    # keys seen by token i of a chunk: prefix + i + 1; two matmuls of 2 * hd FLOPs per (row, key)
    seen = sum(ql * pre + ql * (ql + 1) // 2 for ql, pre in chunks)
    flops = 4 * hd * sh.heads * seen
    return dict(q=q, k=k, v=v, tables=ids.to(torch.int32).to(device), meta=meta), nbytes, flops


def bench_prefill(sh, chunks_by_name, dtype, device, triton_mod, ref_impl, meta_cls, timing):
    rows = []
    for name, chunks in chunks_by_name.items():
        inp, nbytes, flops = prefill_inputs(sh, chunks, dtype, device, meta_cls)
        scale = 1.0 / math.sqrt(sh.head_dim)
        args = (inp["q"], inp["k"], inp["v"], inp["tables"], inp["meta"], scale)
        fn_tri = lambda i: triton_mod.paged_prefill_attention(*args)  # noqa: E731
        fn_ref = lambda i: ref_impl.paged_prefill_attention(*args)    # noqa: E731
        err = rel_err(fn_tri(0), fn_ref(0))
        row = dict(shapes=sh.name, op="paged_prefill_attention", batch=len(chunks), ctx=name,
                   max_len=inp["meta"].max_kv_len, dtype=str(dtype).replace("torch.", ""),
                   rel_err=err, ok=err <= TOL[dtype], tokens=inp["meta"].num_tokens)
        if timing:
            t_tri, path_tri = time_us(fn_tri, device)
            t_ref, path_ref = time_us(fn_ref, device, calls=2)
            row.update(triton_us=t_tri, ref_us=t_ref, path_triton=path_tri, path_ref=path_ref,
                       speedup=t_ref / t_tri, triton_gbs=nbytes / t_tri / 1e3,
                       ref_gbs=nbytes / t_ref / 1e3, bytes=nbytes, flops=flops,
                       triton_tflops=flops / t_tri / 1e6)
        rows.append(row)
        print(format_row(row) + (f"  {row['triton_tflops']:6.1f} TFLOP/s" if timing else ""),
              flush=True)
        inp = None  # free before the next case (a `del` reads as undefined in the lambdas above)
    return rows


def bench_case(sh, batch, ctx, max_len, dtype, device, triton_impl, ref_impl, timing,
               paged_only=False):
    kv_bytes = batch * ctx * sh.kv_heads * sh.head_dim * 2 * torch.finfo(dtype).bits // 8
    # Attention reads a fresh slot set on each call of a graph, > 120 MB in all (L2 is 50 MB).
    rotations = max(1, min(64, math.ceil(120e6 / kv_bytes))) if timing else 1
    calls = max(CALLS, rotations)
    inp = make_inputs(sh, batch, ctx, max_len, dtype, device, rotations)
    inp.update(make_paged_inputs(sh, batch, ctx, max_len, dtype, device, rotations))
    tables = lambda impl: {**({} if paged_only else op_table(sh, inp, impl)),  # noqa: E731
                           **paged_op_table(sh, inp, impl)}
    rows = []
    for name, (fn_tri, nbytes) in tables(triton_impl).items():
        fn_ref = tables(ref_impl)[name][0]
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


def format_row(r: dict) -> str:
    head = f"{r['op']:<23} B={r['batch']:<3} ctx={r['ctx']:<5} L={r['max_len']:<5}"
    err = f"err={r['rel_err']:.1e}{'' if r['ok'] else ' FAIL'}"
    if "triton_us" not in r:
        return f"{head} {err}"
    return (f"{head} triton {r['triton_us']:8.2f} us ({r['triton_gbs']:7.1f} GB/s)  ref "
            f"{r['ref_us']:8.2f} us  x{r['speedup']:5.2f}  {r['path_triton']}/{r['path_ref']}  {err}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, correctness only")
    ap.add_argument("--sweep", action="store_true", help="also sweep the paged kernels' tuning knobs")
    ap.add_argument("--paged-only", action="store_true", help="only the paged-KV ops (no norms, silu)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--combine-sweep", action="store_true",
                    help="only the decode combine's two grids, llama-8b and qwen2-0.5b heads (GPU)")
    ap.add_argument("--split-sweep", action="store_true",
                    help="only the decode split sweep, every preset's head layout at the engine's "
                         "batches and burst-to-long contexts (GPU)")
    ap.add_argument("--split-max-len", type=int, default=8192,
                    help="the table width (max_len) of the split sweep")
    ap.add_argument("--split-layouts", default=",".join(sh.name for sh in SPLIT_SWEEP_LAYOUTS),
                    help="comma-separated head layouts of the split sweep")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton imports
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    import triton

    import replica.kernels.reference as ref_impl
    from benchmarks.kernels_sweeps import (cold_jit, decode_specializations, jit_variants,
                                           sweep_decode_configs, sweep_paged_decode, sweep_prefill)
    from replica.kernels import PrefillMeta, fused, paged_attention, paged_prefill

    class TritonImpl:  # the Triton wrappers, called directly (the dispatcher picks ref on CPU)
        rms_norm, add_rms_norm, silu_mul = fused.rms_norm, fused.add_rms_norm, fused.silu_mul
        rope_store_kv_paged = fused.rope_store_kv_paged
        paged_decode_attention = paged_attention.paged_decode_attention

    device = torch.device("cuda" if cuda else "cpu")
    if args.combine_sweep:
        from benchmarks.kernels_sweeps import sweep_combine
        dtype = getattr(torch, args.dtype)
        rows = [r for sh in (LLAMA_8B, QWEN2_05B) for r in sweep_combine(sh, dtype, device, paged_attention)]
        result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                      dtype=str(dtype)[6:], calls_per_graph=CALLS, replays=REPLAYS, combine=rows)
        path = Path(os.environ.get("OUT", ".")) / "kernels_combine.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
        return 0
    if args.split_sweep:
        dtype = getattr(torch, args.dtype)
        layouts = [sh for sh in SPLIT_SWEEP_LAYOUTS if sh.name in args.split_layouts.split(",")]
        rows = [r for sh in layouts for r in sweep_paged_decode(
            sh, dtype, device, paged_attention, max_len=args.split_max_len,
            batches=(1, 8, 32, 64, 128, 256, 512), ctxs=(448, 2048, 8192))]
        result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                      dtype=str(dtype)[6:], calls_per_graph=CALLS, replays=REPLAYS, split=rows)
        path = Path(os.environ.get("OUT", ".")) / f"kernels_split-{args.split_max_len}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
        return 0
    tiny = args.tiny or not cuda
    dtype = getattr(torch, args.dtype) if cuda else torch.float32  # interpreter: no bf16 tl.dot
    sh, cases = (TINY, CASES_TINY) if tiny else (LLAMA_8B, CASES_8B)
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  "
          f"{sh.name} {str(dtype)[6:]}  timing={'on' if not tiny else 'off'}")
    checks, jit = {}, {}
    if cuda:  # first, before anything compiles the paged kernels
        jit = cold_jit(sh, dtype, device, paged_attention, paged_prefill, PrefillMeta)
    if cuda:  # the small-shape Triton-vs-reference checks (poisoned outputs, cache writes) first
        from replica.kernels import selfcheck
        checks = selfcheck.run("cuda", dtype)
        failed = {k: v for k, v in checks.items() if v != "ok"}
        print(f"selfcheck: {len(checks) - len(failed)}/{len(checks)} ok  {failed or ''}")
    rows, paged_sweeps, specs = [], {}, {}
    for batch, ctx, max_len in cases:
        case_rows, _ = bench_case(sh, batch, ctx, max_len, dtype, device, TritonImpl, ref_impl,
                                  timing=not tiny, paged_only=args.paged_only)   # inputs dropped here
        rows += case_rows
        if cuda:
            torch.cuda.empty_cache()
    prefill_kernels = (paged_prefill._prefill_kernel, paged_prefill._prefill_merge_kernel)
    if cuda:
        for fn in prefill_kernels:  # count what the prefill cases alone compile
            fn.device_caches.clear()
    rows += bench_prefill(sh, PREFILL_CASES_TINY if tiny else PREFILL_CASES_8B, dtype, device,
                          paged_prefill, ref_impl, PrefillMeta, timing=not tiny)
    if cuda:
        specs["prefill"] = {fn.__name__: jit_variants(fn) for fn in prefill_kernels}
        print(f"paged prefill variants over the prefill cases: {specs['prefill']}")
    if args.sweep and not tiny:
        paged_sweeps = dict(decode=sweep_paged_decode(sh, dtype, device, paged_attention),
                            decode_configs=sweep_decode_configs(sh, dtype, device, paged_attention),
                            prefill=sweep_prefill(sh, dtype, device, paged_prefill, PrefillMeta))
    if cuda:
        specs.update(decode_specializations(sh, dtype, device, paged_attention))
    result = dict(device=name, torch=torch.__version__, triton=triton.__version__, shapes=sh.name,
                  dtype=str(dtype)[6:], calls_per_graph=CALLS, replays=REPLAYS, rows=rows,
                  selfcheck=checks, paged_sweep=paged_sweeps,
                  paged_decode_specializations=specs, paged_cold_jit_s=jit)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "kernels.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    bad = [r for r in rows if not r["ok"]] + [k for k, v in checks.items() if v != "ok"]
    if specs and (specs["split_kernel"], specs["combine_kernel"], specs["combine_rows_kernel"]) != (1, 1, 1):
        bad.append("paged decode specialisations")
    print(f"{len(rows) - len(bad)}/{len(rows)} correctness checks ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
