"""Triton flash-decoding attention over the slot-major KV cache.

Contract: same semantics as `reference.decode_attention`: q [B, H, hd]; k/v_cache [S, KVH, L, hd];
row b, head h attends to cache[slot_ids[b], h // (H // KVH), :seq_lens[b]] (GQA), fp32 softmax;
out [B, H, hd] in q.dtype. Requires 1 <= seq_lens[b] <= L (not checked on the device: no syncs) and
int64 slot_ids (slot * slot_stride can pass 2**31). Rows at or past seq_lens[b] are never read.

Design (two launches, no host syncs, grid depends only on shapes, so it is CUDA-graph capturable):
1. `_split_kernel`, grid (B, KVH, NUM_SPLITS), NUM_SPLITS = cdiv(L, SPLIT) from the cache's
   max length. A program owns SPLIT tokens of one (row, kv head); if its split starts at or past
   seq_len it does nothing, so cost follows the actual lengths, not L. It loads every K/V tile
   once for all G = H/KVH query heads (the q tile is padded to >= 16 rows for tl.dot), keeps an
   online softmax in fp32 (exp2 with log2(e) folded into the scale) and writes a partial
   (acc [G, hd], max [G], sum [G]) to fp32 scratch.
2. `_combine_kernel`, grid (B, H), merges the active splits of each (row, head).
When L <= SPLIT there is one split and the first kernel writes the normalised output directly
(one launch). K/V tiles are [BLOCK_N, hd] contiguous blocks (the cache is token-major within a
(slot, kv head)), so loads along hd are coalesced 16-byte vectors.

Supported (else `replica.kernels` falls back to the reference): 16 <= hd <= 256 (tl.dot needs
K >= 16; non-power-of-two hd is padded and masked), H % KVH == 0, last dims contiguous.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NUM_SMS_GUESS = 132  # H100 SXM; only used to pick the split size


def _empty(shape, dtype, device):
    """Scratch allocator (tests swap in a NaN-filling one to prove unused entries are never read)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, len_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr,
                  qk_scale, stride_qb, stride_qh, stride_ks, stride_kh, stride_kn,
                  stride_vs, stride_vh, stride_vn, stride_ob, stride_oh,
                  NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DIRECT: tl.constexpr,
                  PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + b).to(tl.int32)
    start = split * SPLIT
    if start < seq_len:
        end = tl.minimum(start + SPLIT, seq_len)
        slot = tl.load(slot_ptr + b)  # int64: slot * stride may exceed 2**31
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_g                                       # [BLOCK_G]
        q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
        k_base = k_ptr + slot * stride_ks + kvh * stride_kh
        v_base = v_ptr + slot * stride_vs + kvh * stride_vh
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (log2 domain)
        l_i = tl.zeros([BLOCK_G], tl.float32)                # running sum of exp2
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + offs_n
            kv_mask = (n < end)[:, None] & d_mask[None, :]
            k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
            s = tl.where((n < end)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if DIRECT:  # single split: normalise and write the output, no combine pass
            o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            o = acc / l_i[:, None]
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        else:
            # scratch layout: po [B, H, NUM_SPLITS, HEAD_DIM], pm / pl [B, H, NUM_SPLITS]
            idx = (b * NUM_HEADS + heads) * NUM_SPLITS + split                 # [BLOCK_G]
            po_ptrs = po_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(po_ptrs, acc, mask=g_mask[:, None] & d_mask[None, :])
            tl.store(pm_ptr + idx, m_i, mask=g_mask)
            tl.store(pl_ptr + idx, l_i, mask=g_mask)


@triton.jit
def _combine_kernel(po_ptr, pm_ptr, pl_ptr, len_ptr, out_ptr, stride_ob, stride_oh,
                    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                    SPLIT: tl.constexpr, SPLITS_POW2: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(len_ptr + b).to(tl.int32)
    n_active = (seq_len + SPLIT - 1) // SPLIT  # >= 1; splits past it hold garbage, never read
    base = (b * NUM_HEADS + h) * NUM_SPLITS
    offs_s = tl.arange(0, SPLITS_POW2)
    m_all = tl.load(pm_ptr + base + offs_s, mask=offs_s < n_active, other=float("-inf"))
    m_max = tl.max(m_all, axis=0)
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
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)         # [CHUNK, BLOCK_D]
        acc += tl.sum(w[:, None] * o, axis=0)
    out = acc / tl.sum(denom, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


def supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    hd = q.shape[-1]
    h, kvh = q.shape[1], k_cache.shape[1]
    return (q.dim() == 3 and k_cache.dim() == 4 and 16 <= hd <= 256 and kvh > 0
            and h % kvh == 0 and k_cache.shape == v_cache.shape and k_cache.shape[-1] == hd
            and all(t.stride(-1) == 1 for t in (q, k_cache, v_cache)))


def default_split(batch: int, num_kv_heads: int, max_len: int, block_n: int) -> int:
    """Tokens per split: small enough that a full-length batch gives ~8 programs per SM (contexts
    are usually shorter than L, and only splits below seq_len run), at least one tile, at most 256
    (longer splits leave too few programs for short contexts). Tune with benchmarks/kernels_bench.py."""
    per_seq = max(1, 8 * NUM_SMS_GUESS // max(1, batch * num_kv_heads))
    split = triton.next_power_of_2(max(1, math.ceil(max_len / per_seq)))
    return int(min(max(split, block_n), max(256, block_n)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_ids: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     out: Optional[torch.Tensor] = None, split: Optional[int] = None,
                     block_n: Optional[int] = None, num_warps: int = 4,
                     num_stages: int = 2) -> torch.Tensor:
    # q [B, H, hd] -> out [B, H, hd]; `split`/`block_n`/`num_warps`/`num_stages` are tuning knobs
    bsz, h, hd = q.shape
    kvh, max_len = k_cache.shape[1], k_cache.shape[2]
    group = h // kvh
    if block_n is None:
        block_n = 64 if q.element_size() <= 2 else 16  # fp32 (FMA dot) spills at 32
    split = split or default_split(bsz, kvh, max_len, block_n)
    assert split % block_n == 0, "split must be a multiple of block_n"
    num_splits = triton.cdiv(max_len, split)
    if out is None:
        out = torch.empty((bsz, h, hd), dtype=q.dtype, device=q.device)
    direct = num_splits == 1
    if direct:  # pointers unused; pass out to keep the signature uniform
        po = pm = pl = out
    else:
        po = _empty((bsz, h, num_splits, hd), torch.float32, q.device)
        pm = _empty((bsz, h, num_splits), torch.float32, q.device)
        pl = _empty((bsz, h, num_splits), torch.float32, q.device)
    block_d = max(16, triton.next_power_of_2(hd))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 input
    _split_kernel[(bsz, kvh, num_splits)](
        q, k_cache, v_cache, slot_ids, seq_lens, out, po, pm, pl, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        NUM_HEADS=h, GROUP=group, HEAD_DIM=hd, NUM_SPLITS=num_splits, SPLIT=split,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        DIRECT=direct, PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    if not direct:
        splits_pow2 = triton.next_power_of_2(num_splits)
        _combine_kernel[(bsz, h)](
            po, pm, pl, seq_lens, out, out.stride(0), out.stride(1), NUM_HEADS=h, HEAD_DIM=hd,
            NUM_SPLITS=num_splits, SPLIT=split, SPLITS_POW2=splits_pow2,
            CHUNK=min(splits_pow2, 16), BLOCK_D=block_d, num_warps=1 if hd <= 64 else 2)
    return out
