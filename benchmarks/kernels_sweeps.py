"""The paged kernels' tuning sweeps and JIT accounting, for benchmarks/kernels_bench.py.

- `sweep_paged_decode`: paged decode attention over split sizes at contexts far below max_len;
- `sweep_decode_configs`: paged decode attention over warps, stages and key-tile width, against
  the engine's choice, at the row counts and contexts of loaded decode steps;
- `sweep_prefill`: paged prefill attention over pipeline stages and key-segment sizes;
- `sweep_combine`: paged decode attention with each combine grid (per head / per row) at the
  batches where the rule picks one per row, below one split (an empty combine) and above it;
- `decode_specializations`: compiled variants of the decode kernels over the engine's bucket
  ladder (must be 1 + 1: the split is a runtime argument);
- `cold_jit`: seconds of each paged attention kernel's first call (compile + load + run).
CUDA only; kernels_bench.py calls them (`--sweep`, and on every CUDA run for the last two) and
owns the inputs and the timer they share.
"""
from __future__ import annotations

import math
import time

import torch

from benchmarks.kernels_bench import (BLOCK_SIZE, CALLS, LADDER, PREFILL_CASES_8B, make_paged_inputs,
                                      prefill_inputs, time_us)


def decode_case(sh, batch: int, ctx: int, max_len: int, dtype, device, paged_mod):
    """(KV bytes one call reads, table rotations, run) for timing paged decode at `batch` rows of
    `ctx` tokens: enough rotations of the block table that ~120 MB of KV lies between two reads of
    the same block (L2 does not serve the repeats); `run(i, **knobs)` is call i."""
    kv_bytes = batch * ctx * sh.kv_heads * sh.head_dim * 4
    rot = max(1, min(16, math.ceil(120e6 / kv_bytes)))
    inp = make_paged_inputs(sh, batch, ctx, max_len, dtype, device, rot)
    q = torch.randn(batch, sh.heads, sh.head_dim, device=device).to(dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int64, device=device)

    def run(i: int, **knobs):
        return paged_mod.paged_decode_attention(q, inp["pk_cache"], inp["pv_cache"],
                                                inp["tables"][i % rot], inp["table_rows"], lens,
                                                1.0 / math.sqrt(sh.head_dim), **knobs)
    return kv_bytes, rot, run


def sweep_paged_decode(sh, dtype, device, paged_mod, max_len=32768, batches=(1, 8, 64, 256),
                       ctxs=(1024, 8192), splits=(64, 128, 256, 512, 1024, 2048)):
    """paged_decode_attention over split sizes at contexts far below max_len (the engine's case:
    the table is as wide as the longest allowed sequence); rows sorted per (B, ctx)."""
    out = []
    for batch in batches:
        for ctx in ctxs:
            kv_bytes, rot, run = decode_case(sh, batch, ctx, max_len, dtype, device, paged_mod)
            default = paged_mod.decode_plan(batch, sh.heads, sh.kv_heads, sh.head_dim, BLOCK_SIZE,
                                            max_len // BLOCK_SIZE, dtype)[0]["split"]
            case = []
            for split in sorted({*splits, default}):
                t, _ = time_us(lambda i, split=split: run(i, split=split), device, max(CALLS, rot))
                case.append(dict(layout=sh.name, batch=batch, ctx=ctx, max_len=max_len, split=split,
                                 default=split == default, us=t,
                                 gbs=kv_bytes * torch.finfo(dtype).bits / 16 / t / 1e3))
            case.sort(key=lambda r: r["us"])
            best, dflt = case[0], next(r for r in case if r["default"])
            print(f"  paged sweep {sh.name} B={batch:<3} ctx={ctx:<5} L={max_len}: best split="
                  f"{best['split']} {best['us']:8.2f} us; default split={dflt['split']} "
                  f"{dflt['us']:8.2f} us ({dflt['gbs']:6.1f} GB/s, x{dflt['us'] / best['us']:.2f})",
                  flush=True)
            out += case
            run = None  # free the case's pool before the next one
            torch.cuda.empty_cache()
    return out


DECODE_CONFIGS = {"w2s2n32": dict(num_warps=2, num_stages=2, block_n=32),
                  "w4s2n32": dict(num_warps=4, num_stages=2, block_n=32),
                  "w2s2n64": dict(num_warps=2, num_stages=2, block_n=64),
                  "w4s3n64": dict(num_warps=4, num_stages=3, block_n=64),
                  "w8s2n64": dict(num_warps=8, num_stages=2, block_n=64)}


def sweep_decode_configs(sh, dtype, device, paged_mod, max_len=8192):
    """paged_decode_attention with each of DECODE_CONFIGS against the engine's defaults (warps,
    stages, block_n; the split rule stays the engine's), graph-timed; one row per (B, ctx, config)
    with its time relative to the default."""
    out = []
    for batch, ctx in ((8, 1024), (64, 1024), (64, 4096), (256, 512), (512, 512), (512, 1024)):
        kv_bytes, rot, run = decode_case(sh, batch, ctx, max_len, dtype, device, paged_mod)
        times = {}
        for name, knobs in {"default": {}, **DECODE_CONFIGS}.items():
            times[name], _ = time_us(lambda i, knobs=knobs: run(i, **knobs), device, max(CALLS, rot))
        for name, t in times.items():
            out.append(dict(shape=sh.name, batch=batch, ctx=ctx, config=name, us=t,
                            vs_default=t / times["default"],
                            gbs=kv_bytes * torch.finfo(dtype).bits / 16 / t / 1e3))
        best = min(times, key=times.get)
        print(f"  decode configs {sh.name} B={batch:<3} ctx={ctx:<5}: default {times['default']:8.2f} us "
              f"({kv_bytes * torch.finfo(dtype).bits / 16 / times['default'] / 1e3:6.1f} GB/s); " +
              " ".join(f"{n} x{t / times['default']:.2f}" for n, t in times.items() if n != "default") +
              f"; best {best}")
        run = None  # free the case's pool before the next one
        torch.cuda.empty_cache()
    return out


COMBINE_CASES = ((128, 512), (256, 512), (512, 512), (128, 4096), (256, 3000), (512, 2100))


def sweep_combine(sh, dtype, device, paged_mod, max_len=8192):
    """paged_decode_attention (split kernel + combine) with the combine forced to each grid,
    graph-timed, at B x H >= COMBINE_ROWS_MIN_PROGRAMS (where the rule takes one program per row);
    one row per (B, ctx, grid) with the active splits per row and the time relative to the
    per-head grid."""
    out = []
    for batch, ctx in COMBINE_CASES:
        _, rot, run = decode_case(sh, batch, ctx, max_len, dtype, device, paged_mod)
        split = paged_mod.decode_plan(batch, sh.heads, sh.kv_heads, sh.head_dim, BLOCK_SIZE,
                                      max_len // BLOCK_SIZE, dtype)[0]["split"]
        times = {}
        for kind in ("heads", "rows"):
            times[kind], _ = time_us(lambda i, kind=kind: run(i, combine=kind), device, max(CALLS, rot))
        for kind, t in times.items():
            out.append(dict(shape=sh.name, batch=batch, ctx=ctx, split=split,
                            splits_per_row=-(-ctx // split), combine=kind, us=t,
                            vs_heads=t / times["heads"]))
        print(f"  combine {sh.name} B={batch:<3} ctx={ctx:<5} splits/row {-(-ctx // split)}: "
              f"heads {times['heads']:8.2f} us, rows {times['rows']:8.2f} us "
              f"(x{times['rows'] / times['heads']:.3f})")
        run = None  # free the case's pool before the next one
        torch.cuda.empty_cache()
    return out


def sweep_prefill(sh, dtype, device, paged_mod, meta_cls):
    out = []
    for name in ("1x2048", "128+32k_prefix", "4x512+200dec"):
        inp, _, flops = prefill_inputs(sh, PREFILL_CASES_8B[name], dtype, device, meta_cls)
        for stages in (1, 2, 3):
            fn = lambda i: paged_mod.paged_prefill_attention(  # noqa: E731
                inp["q"], inp["k"], inp["v"], inp["tables"], inp["meta"],
                1.0 / math.sqrt(sh.head_dim), num_stages=stages)
            t, _ = time_us(fn, device)
            out.append(dict(case=name, num_stages=stages, us=t, tflops=flops / t / 1e6))
            print(f"  prefill sweep {name:<16} stages={stages}: {t:9.2f} us "
                  f"{flops / t / 1e6:6.1f} TFLOP/s")
        inp = None  # free before the next case (a `del` reads as undefined in the lambdas above)
    for name in ("128+32k_prefix", "4x512+200dec", "2048+30k_prefix"):  # key segments
        chunks = PREFILL_CASES_8B[name]
        inp, _, flops = prefill_inputs(sh, chunks, dtype, device, meta_cls)
        q_lens, kv_lens = [ql for ql, _ in chunks], [ql + pre for ql, pre in chunks]
        for segment in (None, 1024, 4096, 16384, 1 << 20):  # None: default; 1 << 20: no split
            meta = meta_cls.build(q_lens, kv_lens, list(range(len(chunks))), device,
                                  segment=segment)
            fn = lambda i: paged_mod.paged_prefill_attention(  # noqa: E731
                inp["q"], inp["k"], inp["v"], inp["tables"], meta, 1.0 / math.sqrt(sh.head_dim))
            t, _ = time_us(fn, device)
            seg = f"{meta.prefill_segment}/{meta.decode_segment}"
            out.append(dict(case=name, segment=seg, us=t, tflops=flops / t / 1e6,
                            merges=meta.num_prefill_merges + meta.num_decode_merges))
            print(f"  prefill sweep {name:<16} segment={seg:<12}{'(default)' if segment is None else '':9}"
                  f" {t:9.2f} us {flops / t / 1e6:6.1f} TFLOP/s  merges={out[-1]['merges']}")
        inp = None  # free before the next case (a `del` reads as undefined in the lambdas above)
    return out


def jit_variants(fn) -> int:
    """Compiled variants of a Triton kernel held in this process (its per-device JIT caches)."""
    return sum(len(c[0]) for c in fn.device_caches.values())


def decode_specializations(sh, dtype, device, paged_mod, max_len=8192) -> dict:
    """Run paged_decode_attention at every bucket of the engine ladder (contexts 1..64) and count
    the compiled variants of its kernels (split, and each combine grid's). Their in-memory caches
    are emptied first (earlier checks compiled other shapes), so the count is the ladder's alone
    (binaries come back from Triton's disk cache)."""
    kernels = (paged_mod._decode_split_kernel, paged_mod._decode_combine_kernel,
               paged_mod._decode_combine_rows_kernel)
    for fn in kernels:
        fn.device_caches.clear()
    inp = make_paged_inputs(sh, LADDER[-1], 64, max_len, dtype, device, 1)
    for b in LADDER:
        q = torch.randn(b, sh.heads, sh.head_dim, device=device).to(dtype)
        lens = torch.randint(1, 64 + 1, (b,), device=device)
        paged_mod.paged_decode_attention(q, inp["pk_cache"], inp["pv_cache"], inp["tables"][0],
                                         inp["table_rows"][:b], lens, 0.1)
    torch.cuda.synchronize()
    res = dict(ladder=list(LADDER), max_len=max_len,
               split_kernel=jit_variants(paged_mod._decode_split_kernel),
               combine_kernel=jit_variants(paged_mod._decode_combine_kernel),
               combine_rows_kernel=jit_variants(paged_mod._decode_combine_rows_kernel),
               splits={b: paged_mod.decode_plan(b, sh.heads, sh.kv_heads, sh.head_dim, BLOCK_SIZE,
                                                max_len // BLOCK_SIZE, dtype)[0]["split"]
                       for b in LADDER})
    print(f"paged decode specialisations over {len(LADDER)} buckets: split kernel "
          f"{res['split_kernel']}, combine kernels {res['combine_kernel']} + {res['combine_rows_kernel']}; "
          f"splits {res['splits']}")
    return res


def cold_jit(sh, dtype, device, paged_mod, prefill_mod, meta_cls) -> dict:
    """Seconds of the first call of each paged attention launch (Triton compile + load + run; cold
    when TRITON_CACHE_DIR is empty), then of a call at another batch size (no compile expected).
    Must run before anything else launches these kernels in the process."""
    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    inp = make_paged_inputs(sh, 64, 300, 8192, dtype, device, 1)
    hd = sh.head_dim

    def decode(b):
        q = torch.randn(b, sh.heads, hd, device=device).to(dtype)
        lens = torch.full((b,), 300, dtype=torch.int64, device=device)
        paged_mod.paged_decode_attention(q, inp["pk_cache"], inp["pv_cache"], inp["tables"][0],
                                         inp["table_rows"][:b], lens, 0.1)
    pre, _, _ = prefill_inputs(sh, [(100, 50), (1, 40)], dtype, device, meta_cls)
    prefill = lambda: prefill_mod.paged_prefill_attention(  # noqa: E731
        pre["q"], pre["k"], pre["v"], pre["tables"], pre["meta"], 0.1)
    res = dict(decode_first_b8=timed(lambda: decode(8)), decode_then_b64=timed(lambda: decode(64)),
               prefill_first=timed(prefill), prefill_again=timed(prefill))
    print("cold JIT (s): " + "  ".join(f"{k}={v:.3f}" for k, v in res.items()))
    return res
