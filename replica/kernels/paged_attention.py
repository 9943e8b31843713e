"""Triton attention over the paged KV cache: the shared K/V tile loader, and split-K decode.

Contract: same semantics as `reference.paged_decode_attention` / `reference.paged_prefill_attention`.
Cache k/v [num_blocks, KVH, BS, hd] (BS a power of two); block_tables [R, max_blocks] int32 (or
int64); token p of table row r is cache[block_tables[r, p // BS], :, p % BS]. fp32 softmax (exp2
with log2(e) folded into the scale), output in q.dtype. Only positions below each row's length are
read, and only the table entries that cover them (entries past it may hold any value). Not checked
on the device (no syncs): decode needs 1 <= seq_lens[b] <= max_blocks * BS; prefill lengths are
validated on the host by `PrefillMeta.build` and against the table width here.

K/V tiles: BLOCK_N tokens per tile, so a tile spans BLOCK_N / BS blocks (or lies inside one block
when BLOCK_N <= BS); each token's block comes from the table (`bt[row, n // BS]`, an L1 hit for the
BS tokens of a block) and rows are loaded along hd as contiguous 16-byte vectors (when hd % 16 == 0,
so that Triton sees 16-divisible cache strides; other head dims take scalar loads).

Decode (`paged_decode_attention`, CUDA-graph capturable: grid, scratch shapes and constexprs depend
only on tensor shapes, no host syncs):
1. `_decode_split_kernel`, grid (B, KVH, num_splits): program (b, kvh, s) owns tokens
   [s * split, (s + 1) * split) of row b; if that starts at or past seq_len it returns at once, so
   the work follows the real lengths. It loads each K/V tile once for all G = H / KVH query heads
   (q tile padded to BLOCK_G >= 16 rows for tl.dot) and keeps an online softmax. A row whose length
   fits in one split (seq_len <= split) is normalised and written to `out` by that program directly;
   other rows write fp32 partials (acc [G, hd], max [G], sum [G]) to scratch.
2. the combine, for rows with more than one split (rows with one return at once), merging their
   cdiv(seq_len, split) active partials. Two grids (`combine_plan`): (B, H), one program per
   head, vectorised over CHUNK splits (`_decode_combine_kernel`); or, once B x H reaches
   COMBINE_ROWS_MIN_PROGRAMS, (B,), one program per row, vectorised over its heads and walking the
   splits one at a time (`_decode_combine_rows_kernel`). At large B the KV pool bounds the splits
   a row can have (a 512-row llama-8b batch: one), so the combine is mostly empty programs, and
   their number is its cost: 16k programs took 0.35 ms of a 20 ms step on an H200
   (results/step_profile-8b-h200-2026-11-30.json). At small B a row may have hundreds of splits
   (B = 1: 128-token splits), which the per-head grid takes CHUNK at a time.
`split` and `num_splits` are RUNTIME arguments excluded from Triton's specialisation
(`do_not_specialize`), so every batch size and every max_len shares ONE compiled split kernel and
one kernel per combine grid per (dtype, H, KVH, hd, BS, table dtype): the ~18 graph buckets of
1..512 rows cost 3 cold compiles in all (split, per-head combine, per-row combine; an H200
measured 1 + 1 over the 18-bucket ladder before the per-row grid existed). The split
size can therefore follow B freely (`decode_split`): 128 tokens up to B * KVH = 64, then
~1.5 * B * KVH rounded to a power of two, 64..2048 (B=1: 128, B=8: 128, B=64: 1024, B=128: 2048
for KVH=8), fitted to an H200 sweep over five head layouts and short and long contexts; max_len
only caps it (num_splits = cdiv(max_len, split), most of them empty when contexts are far below
max_len: an empty program costs one load of seq_len).

`programs=P` runs the same work items on a persistent grid of P programs
(`_decode_split_persistent`: each walks items p, p + P, ...). The engine does not use it: it is
how benchmarks/overlap_probe.py confines attention to the SMs a GEMM leaves free, and on an H200
one program per SM reads only ~20-27 GB/s, so it needs every SM to approach the grid kernel's
~4 TB/s (results/overlap_probe-persistent-8b-h200-2026-11-30.json).

Prefill (`paged_prefill_attention`, eager) lives in replica/kernels/paged_prefill.py and shares
this module's K/V tile loader, scratch allocator and `supported`.

Supported (else `replica.kernels` falls back to the reference): 16 <= hd <= 256 (tl.dot needs
K >= 16; non-power-of-two hd is padded and masked), H % KVH == 0, BS a power of two, last dims
contiguous, 1-D contiguous table_rows / seq_lens.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from replica.kernels.launch import compiling, launch


LOG2E = 1.4426950408889634
SMALL_GRID_SPLIT = 128  # decode split while B * KVH <= SMALL_GRID; see decode_split
SMALL_GRID = 64
MAX_SPLIT = 2048
GRID_CAP = 65536       # decode programs per launch at most (empty ones included)
COMBINE_ROWS_MIN_PROGRAMS = 4096   # B x H from which the combine runs one program per row


def _empty(shape, dtype, device):
    """Scratch allocator (tests swap in a NaN-filling one to prove unused entries are never read)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _load_kv_tile(base, table, n, n_mask, offs_d, stride_b, stride_n, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr):
    # tokens n [BLOCK_N] of one (sequence, kv head) -> [BLOCK_N, BLOCK_D]; rows with n_mask False
    # (MASKED) read neither the table nor the cache and come back as zeros.
    if MASKED:
        blk = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    else:
        blk = tl.load(table + n // BLOCK_SIZE).to(tl.int64)
    ptrs = base + blk[:, None] * stride_b + (n % BLOCK_SIZE)[:, None] * stride_n + offs_d[None, :]
    if MASKED:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=n_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=n_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


# ----------------------------------------------------------------------------------------------
# decode
@triton.jit
def _decode_split_item(b, kvh, sid, q_ptr, k_ptr, v_ptr, bt_ptr, row_ptr, len_ptr, out_ptr, po_ptr,
                       pm_ptr, pl_ptr, qk_scale, split, num_splits, stride_qb, stride_qh,
                       stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_bt,
                       stride_ob, stride_oh, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # one work item: split `sid` of row b (int64), kv head kvh
    seq_len = tl.load(len_ptr + b).to(tl.int32)
    start = sid * split
    if start < seq_len:
        end = tl.minimum(start + split, seq_len)
        table = bt_ptr + tl.load(row_ptr + b).to(tl.int64) * stride_bt
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_g                                            # [BLOCK_G]
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)          # [BLOCK_G, BLOCK_D]
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (log2 domain)
        l_i = tl.zeros([BLOCK_G], tl.float32)                # running sum of exp2
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + offs_n
            n_mask = n < end
            k = _load_kv_tile(k_base, table, n, n_mask, offs_d, stride_kb, stride_kn, HEAD_DIM,
                              BLOCK_D, BLOCK_SIZE, True)                        # [BLOCK_N, BLOCK_D]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale   # [BLOCK_G, BLOCK_N]
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _load_kv_tile(v_base, table, n, n_mask, offs_d, stride_vb, stride_vn, HEAD_DIM,
                              BLOCK_D, BLOCK_SIZE, True)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        gd_mask = g_mask[:, None] & d_mask[None, :]
        if seq_len <= split:  # the row's only split: normalise and write the output, no combine
            o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)
        else:
            # scratch: po [B, H, num_splits, HEAD_DIM], pm / pl [B, H, num_splits]
            idx = (b * NUM_HEADS + heads) * num_splits + sid                    # [BLOCK_G]
            tl.store(po_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gd_mask)
            tl.store(pm_ptr + idx, m_i, mask=g_mask)
            tl.store(pl_ptr + idx, l_i, mask=g_mask)


@triton.jit(do_not_specialize=["split", "num_splits"])
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, row_ptr, len_ptr, out_ptr, po_ptr, pm_ptr,
                         pl_ptr, qk_scale, split, num_splits, stride_qb, stride_qh, stride_kb,
                         stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_bt,
                         stride_ob, stride_oh, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # grid (B, KVH, num_splits): one program per work item
    _decode_split_item(tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2), q_ptr,
                       k_ptr, v_ptr, bt_ptr, row_ptr, len_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr,
                       qk_scale, split, num_splits, stride_qb, stride_qh, stride_kb, stride_kh,
                       stride_kn, stride_vb, stride_vh, stride_vn, stride_bt, stride_ob, stride_oh,
                       NUM_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE, BLOCK_G, BLOCK_N, BLOCK_D, PRECISION)


@triton.jit(do_not_specialize=["split", "num_splits", "batch"])
def _decode_split_persistent(q_ptr, k_ptr, v_ptr, bt_ptr, row_ptr, len_ptr, out_ptr, po_ptr,
                             pm_ptr, pl_ptr, qk_scale, split, num_splits, batch, stride_qb,
                             stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                             stride_vn, stride_bt, stride_ob, stride_oh,
                             NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr):
    # grid (P,): program p walks items p, p + P, ... in split-major order, so the items that hold
    # tokens (low splits) come first and spread over every program; the empty tail costs a load
    per_split = batch * (NUM_HEADS // GROUP)
    for item in range(tl.program_id(0), per_split * num_splits, tl.num_programs(0)):
        rem = item % per_split
        _decode_split_item((rem // (NUM_HEADS // GROUP)).to(tl.int64), rem % (NUM_HEADS // GROUP),
                           item // per_split, q_ptr, k_ptr, v_ptr, bt_ptr, row_ptr, len_ptr,
                           out_ptr, po_ptr, pm_ptr, pl_ptr, qk_scale, split, num_splits, stride_qb,
                           stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                           stride_vn, stride_bt, stride_ob, stride_oh, NUM_HEADS, GROUP, HEAD_DIM,
                           BLOCK_SIZE, BLOCK_G, BLOCK_N, BLOCK_D, PRECISION)


@triton.jit(do_not_specialize=["split", "num_splits"])
def _decode_combine_kernel(po_ptr, pm_ptr, pl_ptr, len_ptr, out_ptr, split, num_splits,
                           stride_ob, stride_oh, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(len_ptr + b).to(tl.int32)
    n_active = (seq_len + split - 1) // split  # splits past it hold garbage, never read
    if n_active > 1:  # one split: the split kernel already wrote this row
        base = (b * NUM_HEADS + h) * num_splits
        m_run = tl.full([CHUNK], float("-inf"), tl.float32)
        for s0 in range(0, n_active, CHUNK):
            s = s0 + tl.arange(0, CHUNK)
            m_run = tl.maximum(m_run, tl.load(pm_ptr + base + s, mask=s < n_active,
                                              other=float("-inf")))
        m_max = tl.max(m_run, axis=0)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        acc = tl.zeros([BLOCK_D], tl.float32)
        denom = tl.zeros([CHUNK], tl.float32)
        for s0 in range(0, n_active, CHUNK):  # CHUNK splits at a time keeps the tile small
            s = s0 + tl.arange(0, CHUNK)
            s_mask = s < n_active
            w = tl.exp2(tl.load(pm_ptr + base + s, mask=s_mask, other=float("-inf")) - m_max)
            denom += w * tl.load(pl_ptr + base + s, mask=s_mask, other=0.0)
            o = tl.load(po_ptr + (base + s)[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=s_mask[:, None] & d_mask[None, :], other=0.0)     # [CHUNK, BLOCK_D]
            acc += tl.sum(w[:, None] * o, axis=0)
        out = acc / tl.sum(denom, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d,
                 out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit(do_not_specialize=["split", "num_splits"])
def _decode_combine_rows_kernel(po_ptr, pm_ptr, pl_ptr, len_ptr, out_ptr, split, num_splits,
                                stride_ob, stride_oh, NUM_HEADS: tl.constexpr,
                                HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    # grid (B,): program b merges every head of row b, one split at a time (online, as the split
    # kernel's softmax): tiles [BLOCK_H] of max / sum and [BLOCK_H, BLOCK_D] of partial output
    b = tl.program_id(0).to(tl.int64)
    seq_len = tl.load(len_ptr + b).to(tl.int32)
    n_active = (seq_len + split - 1) // split
    if n_active > 1:  # one split: the split kernel already wrote this row
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        h_mask = offs_h < NUM_HEADS
        hd_mask = h_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        base = (b * NUM_HEADS + offs_h) * num_splits                            # [BLOCK_H]
        m_run = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for s in range(0, n_active):
            # padding heads read max 0 and sum 1 (no inf - inf, no 0 / 0); they are never stored
            m_s = tl.load(pm_ptr + base + s, mask=h_mask, other=0.0)
            l_s = tl.load(pl_ptr + base + s, mask=h_mask, other=1.0)
            o_s = tl.load(po_ptr + (base + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=hd_mask,
                          other=0.0)
            m_new = tl.maximum(m_run, m_s)
            a_run = tl.exp2(m_run - m_new)
            a_s = tl.exp2(m_s - m_new)
            acc = acc * a_run[:, None] + o_s * a_s[:, None]
            l_run = l_run * a_run + l_s * a_s
            m_run = m_new
        out = acc / l_run[:, None]
        tl.store(out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hd_mask)


def combine_plan(bsz: int, h: int, hd: int, kind: Optional[str] = None) -> tuple:
    """(kernel, grid, constexprs, num_warps) of the combine launch; kind "heads" or "rows" forces
    a grid (tests, benchmarks), None takes the rule in the module docstring."""
    block_d = max(16, triton.next_power_of_2(hd))
    if kind is None:
        kind = "rows" if bsz * h >= COMBINE_ROWS_MIN_PROGRAMS else "heads"
    if kind == "rows":
        block_h = triton.next_power_of_2(h)
        return (_decode_combine_rows_kernel, (bsz,),
                dict(NUM_HEADS=h, HEAD_DIM=hd, BLOCK_H=block_h, BLOCK_D=block_d),
                4 if block_h * block_d >= 2048 else 2)
    assert kind == "heads", kind
    return (_decode_combine_kernel, (bsz, h),
            dict(NUM_HEADS=h, HEAD_DIM=hd, CHUNK=16, BLOCK_D=block_d), 1 if hd <= 64 else 2)


def supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_tables: torch.Tensor, *row_vectors: torch.Tensor) -> bool:
    """Shapes the kernels take. row_vectors: 1-D per-row inputs (table_rows, seq_lens)."""
    if q.dim() != 3 or k_cache.dim() != 4 or block_tables.dim() != 2:
        return False
    h, hd = q.shape[1], q.shape[2]
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    return (16 <= hd <= 256 and kvh > 0 and h % kvh == 0 and bs > 0 and bs & (bs - 1) == 0
            and k_cache.shape == v_cache.shape and k_cache.shape[-1] == hd
            and block_tables.dtype in (torch.int32, torch.int64)
            and all(t.stride(-1) == 1 for t in (q, k_cache, v_cache, block_tables))
            and all(t.dim() == 1 and (t.stride(0) == 1 or t.shape[0] <= 1) for t in row_vectors))


def _wide(dtype: torch.dtype, hd: int) -> bool:
    """16-bit tensor-core tiles. fp32 (an FMA dot, GPU tests only) and head dims that are not a
    multiple of 16 (cache strides without Triton's 16-divisibility: scalar loads, one address
    register per element) take 16-key tiles, or they spill."""
    return dtype in (torch.float16, torch.bfloat16) and hd % 16 == 0


def decode_block_n(dtype: torch.dtype, hd: int) -> int:
    return 64 if _wide(dtype, hd) else 16


def decode_split(batch: int, num_kv_heads: int, max_len: int, block_n: int) -> int:
    """Tokens per split, a power of two. The kernels take it at run time, so any value costs no
    compile and it may follow B exactly. Graph-captured decode cannot see the contexts, so the
    rule is fitted to be near the best over short AND long ones, from x = B * KVH (the programs a
    split spreads over): SMALL_GRID_SPLIT tokens while x <= SMALL_GRID (64 when x <= 2), else
    ~1.5x tokens, at most MAX_SPLIT; at least one tile, and large enough that the grid (empty
    programs included) stays under GRID_CAP programs.
    H200 sweeps (results/kernels_split-h200-2026-12-01.json: five head layouts, B 1-512, contexts
    448 / 2048 / 8192 at max_len 8192; -32768- for three layouts at max_len 32768): this rule's
    time is x1.03 / x1.04 of the best split's (geometric mean; worst x1.23 / x1.22), where the
    earlier ~45 * sqrt(x) rule read x1.04 / x1.04 (worst x1.40 / x1.27: short contexts at 8-128
    rows of the 2- and 4-KV-head layouts, whose few long splits left most SMs idle)."""
    x = max(1, batch * num_kv_heads)
    if x <= SMALL_GRID:
        rule = 64 if x <= 2 else SMALL_GRID_SPLIT
    else:
        rule = 2 ** round(math.log2(1.5 * x))
    floor = triton.next_power_of_2(triton.cdiv(max_len * batch * num_kv_heads, GRID_CAP))
    split = max(min(rule, MAX_SPLIT), floor, block_n)
    return min(split, max(block_n, triton.next_power_of_2(max_len)))


def decode_plan(bsz: int, h: int, kvh: int, hd: int, bs: int, max_blocks: int,
                dtype: torch.dtype, split: Optional[int] = None,
                block_n: Optional[int] = None) -> tuple[dict, dict]:
    """(runtime args, constexprs) of one decode launch. Only the runtime args (split, num_splits,
    and the grid) depend on the batch size, so the compiled kernels do not."""
    block_n = block_n or decode_block_n(dtype, hd)
    split = split or decode_split(bsz, kvh, max_blocks * bs, block_n)
    assert split % block_n == 0, "split must be a multiple of block_n"
    runtime = dict(split=split, num_splits=triton.cdiv(max_blocks * bs, split))
    consts = dict(NUM_HEADS=h, GROUP=h // kvh, HEAD_DIM=hd, BLOCK_SIZE=bs,
                  BLOCK_G=max(16, triton.next_power_of_2(h // kvh)), BLOCK_N=block_n,
                  BLOCK_D=max(16, triton.next_power_of_2(hd)),
                  PRECISION="ieee" if dtype == torch.float32 else "tf32")  # tf32: fp32 input only
    return runtime, consts


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, table_rows: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, out: Optional[torch.Tensor] = None,
                           split: Optional[int] = None, block_n: Optional[int] = None,
                           num_warps: int = 4, num_stages: int = 2,
                           programs: Optional[int] = None,
                           combine: Optional[str] = None) -> torch.Tensor:
    # q [B, H, hd] -> out [B, H, hd]; `split`/`block_n`/`num_warps`/`num_stages` are tuning knobs,
    # `combine` forces the combine's grid ("heads" / "rows"; see combine_plan).
    # `programs`: run the split kernel as a persistent grid of that many programs (each walks the
    # work items), so it occupies at most that many SMs and can run beside a GEMM on the others
    bsz, h, hd = q.shape
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    rt, consts = decode_plan(bsz, h, kvh, hd, bs, block_tables.shape[1], q.dtype, split, block_n)
    split, num_splits = rt["split"], rt["num_splits"]
    if out is None:
        out = torch.empty((bsz, h, hd), dtype=q.dtype, device=q.device)
    if num_splits == 1:  # every row fits one split: no partials, no combine (fp32 dummy keeps
        po = pm = pl = _empty((1,), torch.float32, q.device)  # the kernel signature unchanged)
    else:
        po = _empty((bsz, h, num_splits, hd), torch.float32, q.device)
        pm = _empty((bsz, h, num_splits), torch.float32, q.device)
        pl = _empty((bsz, h, num_splits), torch.float32, q.device)
    head = (q, k_cache, v_cache, block_tables, table_rows, seq_lens, out, po, pm, pl, scale * LOG2E,
            split, num_splits)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
               out.stride(0), out.stride(1))
    if programs:
        launch(_decode_split_persistent, (programs,), *head, bsz, *strides, num_warps=num_warps,
               num_stages=num_stages, **consts)
    else:
        launch(_decode_split_kernel, (bsz, kvh, num_splits), *head, *strides, num_warps=num_warps,
               num_stages=num_stages, **consts)
    if num_splits > 1:
        # compile-ahead (start-up's probe runs the widest batch) compiles both grids: the bucket
        # ladder's small batches take the per-head one, its large ones the per-row one
        for kind in ("heads", "rows") if compiling() and combine is None else (combine,):
            kernel, grid, meta, warps = combine_plan(bsz, h, hd, kind)
            launch(kernel, grid, po, pm, pl, seq_lens, out, split, num_splits, out.stride(0),
                   out.stride(1), num_warps=warps, **meta)
    return out
