"""Can decode attention confined to a few SMs still read KV at the copy rate? A flat-loop probe.

Decode attention would have to run beside the GEMMs on SMs of its own to overlap with them (see
docs/perf-notes.md, sessions 8-9). The engine's split kernel reaches ~4 TB/s only with thousands
of CTAs in flight. Its persistent variant (`paged_decode_attention(programs=P)`) walks work
items one after another; each item's loop drains the load pipeline at its end, and one program
per SM read 20-27 GB/s. 132 SMs at that rate is ~3 TB/s, so attention needs every SM.

This probe asks whether the drain is the limit. Its kernel walks a flat range of (item, key tile)
pairs, stream-K style: program p takes tiles [p * chunk, (p + 1) * chunk) of all rows x KV heads
x tiles, so the software pipeline runs across item boundaries and never drains. An item cut
between two programs leaves two fp32 partials, merged after. It measures:
- GB/s of K/V read at P programs, against the engine's grid kernel on the same pool;
- correctness against the reference attention (max relative error);
- with `--overlap`, overlap_probe's pipelined schedule (two half-batches, GEMMs on one stream
  with a cuBLASLt SM carveout of P, attention on another), the flat kernel on P programs.

Probe only: every row has the same context (`--ctx`), so item and tile follow from the flat
index by division. The engine's variable lengths would need a prefix sum over rows.

    python3 benchmarks/flat_attention_probe.py --out $OUT/flat_attention.json --overlap   # GPU, ~1 min
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common as C  # noqa: E402
from benchmarks import overlap_probe as OP  # noqa: E402
from benchmarks.decode_shapes import timed_ms  # noqa: E402

from replica.kernels import reference  # noqa: E402
from replica.kernels.paged_attention import LOG2E, _load_kv_tile  # noqa: E402
from replica.presets import PRESETS  # noqa: E402


@triton.jit
def _segment_start(t, j, start, m_i, l_i, acc):
    # a new item, or this program's first tile: fresh softmax state (arithmetic, not a branch)
    first = (j == 0) | (t == start)
    return tl.where(first, float("-inf"), m_i), tl.where(first, 0.0, l_i), tl.where(first, 0.0, acc)


@triton.jit
def _load_q(q_ptr, b, kvh, stride_qb, stride_qh, offs_g, offs_d, GROUP: tl.constexpr):
    # the GROUP query heads of kv head kvh, row b, padded to [BLOCK_G, HEAD_DIM]
    heads = kvh * GROUP + offs_g
    return tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                   mask=(offs_g < GROUP)[:, None], other=0.0)


@triton.jit
def _online_softmax(q, k, v, m_i, l_i, acc, qk_scale):
    # one key tile into the running (max, sum, acc) of the query heads
    s = tl.dot(q, tl.trans(k)) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _store_partial(po_ptr, pm_ptr, pl_ptr, item, t, j, start, end, tiles, m_i, l_i, acc, offs_g,
                   offs_d, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr):
    # at a segment's last tile: partials [items, 2, BLOCK_G, ...], part 0 the segment that starts
    # at the item's first tile, part 1 one that starts mid-item (before this program's range)
    last = (j == tiles - 1) | (t == end - 1)
    part = ((t - j) < start).to(tl.int64)
    idx = (item.to(tl.int64) * 2 + part) * BLOCK_G + offs_g
    keep = (offs_g >= 0) & last                          # masked stores, no branch
    tl.store(po_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=keep[:, None])
    tl.store(pm_ptr + idx, m_i, mask=keep)
    tl.store(pl_ptr + idx, l_i, mask=keep)


@triton.jit
def _flat_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, po_ptr, pm_ptr, pl_ptr, qk_scale, total, chunk,
                        tiles, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb,
                        stride_vh, stride_vn, stride_bt, KVH: tl.constexpr, GROUP: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                        BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr = None):
    # program p: flat tiles [p * chunk, (p + 1) * chunk); tile t is key tile t % tiles of item
    # t // tiles = (row, kv head); K/V gathered through the block table, BLOCK_N keys a tile
    start = tl.program_id(0) * chunk
    end = tl.minimum(start + chunk, total)
    offs_g, offs_n, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for t in tl.range(start, end, num_stages=LOOP_STAGES):   # None: the kernel's num_stages
        item, j = t // tiles, t % tiles
        b, kvh = (item // KVH).to(tl.int64), item % KVH
        m_i, l_i, acc = _segment_start(t, j, start, m_i, l_i, acc)
        q = _load_q(q_ptr, b, kvh, stride_qb, stride_qh, offs_g, offs_d, GROUP)
        table, n = bt_ptr + b * stride_bt, j * BLOCK_N + offs_n
        k = _load_kv_tile(k_ptr + kvh * stride_kh, table, n, n >= 0, offs_d, stride_kb, stride_kn,
                          HEAD_DIM, HEAD_DIM, BLOCK_SIZE, False)
        v = _load_kv_tile(v_ptr + kvh * stride_vh, table, n, n >= 0, offs_d, stride_vb, stride_vn,
                          HEAD_DIM, HEAD_DIM, BLOCK_SIZE, False)
        m_i, l_i, acc = _online_softmax(q, k, v, m_i, l_i, acc, qk_scale)
        _store_partial(po_ptr, pm_ptr, pl_ptr, item, t, j, start, end, tiles, m_i, l_i, acc, offs_g,
                       offs_d, HEAD_DIM, BLOCK_G)


@triton.jit
def _flat_decode_tma_kernel(q_ptr, k_desc, v_desc, bt_ptr, po_ptr, pm_ptr, pl_ptr, qk_scale, total,
                            chunk, tiles, stride_qb, stride_qh, stride_bt, KVH: tl.constexpr,
                            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            BLOCK_G: tl.constexpr, LOOP_STAGES: tl.constexpr = None,
                            WS: tl.constexpr = False):
    # as _flat_decode_kernel with one KV block (BLOCK_SIZE keys) a tile, K and V each one TMA load
    # of [BLOCK_SIZE, HEAD_DIM] from the cache seen as rows (block * KVH + kvh) * BS + offset;
    # WS asks Triton for warp specialization of the loop (load warps apart from math warps)
    start = tl.program_id(0) * chunk
    end = tl.minimum(start + chunk, total)
    offs_g, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for t in tl.range(start, end, num_stages=LOOP_STAGES, warp_specialize=WS):
        item, j = t // tiles, t % tiles
        b, kvh = (item // KVH).to(tl.int64), item % KVH
        m_i, l_i, acc = _segment_start(t, j, start, m_i, l_i, acc)
        q = _load_q(q_ptr, b, kvh, stride_qb, stride_qh, offs_g, offs_d, GROUP)
        row0 = (tl.load(bt_ptr + b * stride_bt + j) * KVH + kvh) * BLOCK_SIZE
        m_i, l_i, acc = _online_softmax(q, k_desc.load([row0, 0]), v_desc.load([row0, 0]), m_i, l_i,
                                        acc, qk_scale)
        _store_partial(po_ptr, pm_ptr, pl_ptr, item, t, j, start, end, tiles, m_i, l_i, acc, offs_g,
                       offs_d, HEAD_DIM, BLOCK_G)


def flat_decode(q, k, v, tables, ctx: int, scale: float, programs: int, block_n: int = 64,
                num_warps: int = 4, num_stages: int = 3, tma: bool = False, loop_stages=None,
                ws: bool = False) -> torch.Tensor:
    """q [B, H, hd], every row `ctx` keys (ctx % block_n == 0) -> out [B, H, hd]. `tma`: the TMA
    kernel (one block per tile: block_n is the cache's block size). `loop_stages`: the loop's own
    pipelining depth (`tl.range(num_stages=...)`, which pipelines every load in the loop, where the
    kernel's `num_stages` pipelines loads feeding dots); `ws`: warp-specialize the TMA loop."""
    bsz, h, hd = q.shape
    kvh, bs = k.shape[1], k.shape[2]
    block_n = bs if tma else block_n
    group, block_g = h // kvh, max(16, triton.next_power_of_2(h // kvh))
    tiles = ctx // block_n
    items = bsz * kvh
    total = items * tiles
    chunk = triton.cdiv(total, programs)
    assert chunk >= tiles, "an item may span at most two programs (two partials)"
    po = torch.zeros(items, 2, block_g, hd, device=q.device, dtype=torch.float32)
    pm = torch.full((items, 2, block_g), float("-inf"), device=q.device, dtype=torch.float32)
    pl = torch.zeros(items, 2, block_g, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(total, chunk),)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        descs = [TensorDescriptor.from_tensor(c.view(-1, hd), [bs, hd]) for c in (k, v)]
        _flat_decode_tma_kernel[grid](
            q, *descs, tables, po, pm, pl, scale * LOG2E, total, chunk, tiles, q.stride(0), q.stride(1),
            tables.stride(0), KVH=kvh, GROUP=group, HEAD_DIM=hd, BLOCK_SIZE=bs, BLOCK_G=block_g,
            LOOP_STAGES=loop_stages, WS=ws, num_warps=num_warps, num_stages=num_stages)
    else:
        _flat_decode_kernel[grid](
            q, k, v, tables, po, pm, pl, scale * LOG2E, total, chunk, tiles, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), tables.stride(0),
            KVH=kvh, GROUP=group, HEAD_DIM=hd, BLOCK_SIZE=bs, BLOCK_G=block_g, BLOCK_N=block_n,
            LOOP_STAGES=loop_stages, num_warps=num_warps, num_stages=num_stages)
    m = pm.max(dim=1, keepdim=True).values                               # [items, 1, G]
    w = torch.exp2(pm - m)                                               # empty part: 0
    out = (po * w[..., None]).sum(1) / (pl * w).sum(1)[..., None]         # [items, G, hd]
    return out[:, :group].reshape(bsz, h, hd).to(q.dtype)


CONFIGS = {"w4s3": dict(num_warps=4, num_stages=3), "w8s6": dict(num_warps=8, num_stages=6),
           "tma/w4s4": dict(num_warps=4, num_stages=4, tma=True),
           "tma/w4s8": dict(num_warps=4, num_stages=8, tma=True),
           "tma/w8s12": dict(num_warps=8, num_stages=12, tma=True),
           # session 13: loop-level pipelining of every load, 128-key tiles, warp specialization
           "w4/loop4": dict(num_warps=4, num_stages=3, loop_stages=4),
           "w8/loop6": dict(num_warps=8, num_stages=3, loop_stages=6),
           "w8s3/n128": dict(num_warps=8, num_stages=3, block_n=128),
           "w8/loop4/n128": dict(num_warps=8, num_stages=3, loop_stages=4, block_n=128),
           "tma/w4/loop8": dict(num_warps=4, num_stages=4, tma=True, loop_stages=8),
           "tma/w4s4/ws": dict(num_warps=4, num_stages=4, tma=True, ws=True)}


class FlatLayer(OP.Layer):
    """overlap_probe's layer whose attention is the flat kernel when given `programs`."""

    def __init__(self, p: dict, rows: int, ctx: int, block_size: int, device: str, dtype):
        super().__init__(p, rows, ctx, block_size, device, dtype)
        self.ctx = ctx                       # a host int: reading lens would sync inside a capture

    def attend(self, q, lo: int, **knobs):
        if not knobs.get("programs"):
            return super().attend(q, lo, **knobs)
        n = q.shape[0]
        return flat_decode(q, self.k, self.v, self.tables[lo:lo + n], self.ctx, self.hd ** -0.5,
                           **knobs)


def cpu_check() -> dict:
    """Max abs error against the reference attention, fp32 on Triton's interpreter
    (TRITON_INTERPRET=1): 12 items of 4 tiles over P programs, so P = 5 and 12 cut items."""
    torch.manual_seed(0)
    b, h, kvh, hd, bs, ctx = 6, 8, 2, 16, 8, 64
    blocks = b * ctx // bs + 1
    k = torch.randn(blocks, kvh, bs, hd)
    v = torch.randn_like(k)
    tables = torch.randperm(blocks - 1)[:b * ctx // bs].view(b, ctx // bs).to(torch.int32)
    q = torch.randn(b, h, hd)
    ref = reference.paged_decode_attention(q, k, v, tables, torch.arange(b), torch.full((b,), ctx), hd ** -0.5)
    errs = {}
    for tma in (False, True):
        for progs in (1, 3, 5, 12):
            out = flat_decode(q, k, v, tables, ctx, hd ** -0.5, programs=progs, block_n=16, num_warps=1,
                              num_stages=1, tma=tma)
            errs[f"{'tma' if tma else 'plain'}/p{progs}"] = (out - ref).abs().max().item()
    return errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--programs", default="16,32,48,66,132,264")
    ap.add_argument("--overlap", action="store_true", help="also overlap_probe's pipelined schedule")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-check", action="store_true", help="only: the kernels against the reference on "
                    "Triton's interpreter (run with TRITON_INTERPRET=1); prints a JSON of errors")
    a = ap.parse_args()
    if a.cpu_check:
        from replica.kernels import _interpreter
        _interpreter.patch()
        print(json.dumps(cpu_check()))
        return
    dev, dt = "cuda", torch.bfloat16
    layer = FlatLayer(PRESETS[a.model], a.rows, a.ctx, 16, dev, dt)
    x = torch.randn(a.rows, PRESETS[a.model]["hidden_size"], device=dev, dtype=dt)
    q = layer.qkv(x)
    ref = reference.paged_decode_attention(q.float(), layer.k.float(), layer.v.float(), layer.tables,
                                           layer.table_rows, layer.lens, layer.hd ** -0.5)
    rec = {"env": C.env_info(dev), "args": vars(a), "kv_bytes": layer.kv_bytes(), "gbps": {}, "max_rel_err": {}}
    ms = timed_ms(lambda: layer.attend(q, 0), dev)
    rec["gbps"]["grid/engine"] = layer.kv_bytes() / ms / 1e6
    for progs in [int(p) for p in a.programs.split(",")]:
        for name, cfg in CONFIGS.items():
            key = f"p{progs}/{name}"
            try:
                out = layer.attend(q, 0, programs=progs, **cfg)
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                ms = timed_ms(lambda: layer.attend(q, 0, programs=progs, **cfg), dev)
            except Exception as e:    # a variant this Triton cannot compile: recorded, skipped
                rec.setdefault("errors", {})[key] = f"{type(e).__name__}: {str(e)[:200]}"
                C.log(f"{key:12s} failed: {rec['errors'][key]}")
                continue
            rec["gbps"][key], rec["max_rel_err"][key] = layer.kv_bytes() / ms / 1e6, err
            C.log(f"{key:12s} {rec['gbps'][key]:7.0f} GB/s  ({rec['gbps'][key] / progs:5.1f} per program)  err {err:.1e}")
    C.log(f"grid/engine  {rec['gbps']['grid/engine']:7.0f} GB/s")
    if a.overlap:
        side = torch.cuda.Stream()
        per_layer = lambda fn: timed_ms(fn, dev) / a.layers   # noqa: E731
        res = rec["overlap_ms_per_layer"] = {}
        with OP.blas("cublas", None):
            res["serial"] = per_layer(lambda: OP.serial(layer, x, a.layers))
        for progs in [int(p) for p in a.programs.split(",") if int(p) < 132]:
            best = max((n for n in CONFIGS if f"p{progs}/{n}" in rec["gbps"]), key=lambda n: rec["gbps"][f"p{progs}/{n}"])
            with OP.blas("cublaslt", progs):
                res[f"pipelined/carve{progs}/flat-{best}"] = per_layer(
                    lambda: OP.pipelined(layer, x, a.layers, side, programs=progs, **CONFIGS[best]))
        for k, v in res.items():
            C.log(f"{k:36s} {v:.4f} ms/layer  x{v / res['serial']:.3f} of serial")
    C.write_json(C.out_path(a.out, "flat_attention"), rec)


if __name__ == "__main__":
    main()
