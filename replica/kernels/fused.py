"""Triton kernels for the element-wise ops: rms_norm, add_rms_norm, qk_rms_norm_, silu_mul,
rope_store_kv_paged.

Contract: same semantics as `reference.py` (fp32 math, one rounding to the output dtype,
`add_rms_norm` updates `residual` in place). Each op is ONE kernel launch, allocates its output with
`torch.empty` (or writes `out=` when given: tests poison it with NaN), reads only tensor shapes and
strides on the host, so every op is CUDA-graph capturable once it has been compiled (run it once
eagerly before capture so Triton's JIT does not compile inside the capture).

`*_supported(...)` say which inputs these kernels take; `replica.kernels` falls back to the reference
for the rest: the last dim of every tensor must be contiguous (stride 1); rms rows up to 65536
elements; rope needs an even head_dim and a power-of-two block size.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from replica.kernels.launch import launch

MAX_NORM_DIM = 65536


def _last_dim_contiguous(*ts: torch.Tensor) -> bool:
    return all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in ts)


# ----------------------------------------------------------------------------------------------
# rms_norm / add_rms_norm: one program per row, the whole row in registers.
@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_res, stride_out, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + row * stride_res + offs
        r = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the residual dtype first: normed = rms_norm(new_residual) exactly.
        s = (x + r).to(res_ptr.dtype.element_ty)
        tl.store(res_ptrs, s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _head_rms_norm_kernel(x_ptr, qw_ptr, kw_ptr, stride_tok, num_q_heads, D, eps, BLOCK_D: tl.constexpr):
    # program (token, head) over the first H + KVH heads of a qkv row: in place, query heads with
    # qw, key heads with kw
    tok, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    ptrs = x_ptr + tok * stride_tok + head * D + offs
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    if head < num_q_heads:
        w = tl.load(qw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.load(kw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (x * rstd * w).to(x_ptr.dtype.element_ty), mask=mask)


def qk_norm_supported(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> bool:
    return (qkv.dim() == 2 and q_weight.shape == k_weight.shape and q_weight.dim() == 1
            and 0 < q_weight.shape[0] <= MAX_NORM_DIM and _last_dim_contiguous(qkv, q_weight, k_weight))


def qk_rms_norm_(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int,
                 num_kv_heads: int, eps: float) -> torch.Tensor:
    # qkv [N, (H + 2*KVH) * hd], normed in place per head (reference.qk_rms_norm_); returns qkv
    hd = q_weight.shape[0]
    block = triton.next_power_of_2(hd)
    launch(_head_rms_norm_kernel, (qkv.shape[0], num_heads + num_kv_heads), qkv, q_weight, k_weight,
           qkv.stride(0), num_heads, hd, eps, BLOCK_D=block, num_warps=1 if block <= 256 else 4)
    return qkv


def norm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dim() == 2 and weight.dim() == 1 and x.shape[1] == weight.shape[0]
            and 0 < x.shape[1] <= MAX_NORM_DIM and _last_dim_contiguous(x, weight))


def _launch_norm(x, residual, weight, eps, out):
    n, d = x.shape
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    block = triton.next_power_of_2(d)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    res = residual if residual is not None else x  # unused pointer when HAS_RESIDUAL=False
    launch(_rms_norm_kernel, (n,), x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), d,
           eps, HAS_RESIDUAL=residual is not None, BLOCK_D=block, num_warps=warps)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    # x [N, D], weight [D] -> [N, D]
    return _launch_norm(x, None, weight, eps, out)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    # residual [N, D] is updated in place to x + residual and returned as new_residual
    return _launch_norm(x, residual, weight, eps, out), residual


# ----------------------------------------------------------------------------------------------
# silu_mul: grid (N, cdiv(I, BLOCK)); 8 elements per thread -> 16-byte loads in bf16.
@triton.jit
def _silu_mul_kernel(in_ptr, out_ptr, stride_in, stride_out, INTER, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(in_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(in_ptr + row * stride_in + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_supported(gate_up: torch.Tensor) -> bool:
    return gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0 and _last_dim_contiguous(gate_up)


def silu_mul(gate_up: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    # gate_up [N, 2I] -> [N, I]
    n, two_i = gate_up.shape
    inter = two_i // 2
    if out is None:
        out = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(max(inter, 16)))
    grid = (n, triton.cdiv(inter, block))
    launch(_silu_mul_kernel, grid, gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block,
           num_warps=4 if block >= 512 else 1)
    return out


# ----------------------------------------------------------------------------------------------
# rope_store_kv_paged: grid (N, 2). Program (n, 0) rotates all H query heads of token n into q_out as
# one [H, hd/2] tile pair; program (n, 1) rotates the KVH key heads into the k cache and copies the
# value heads into the v cache. (One program per (token, head) before: 40 programs of 64 elements
# per llama-8b token, ~1 TB/s on an H200 at 2560 tokens, where whole-row tiles stream at the copy
# rate.) In qkv, head j (q heads, then k heads, then v heads) starts at column j * hd. The caches
# are paged [num_blocks, KVH, BLOCK_SIZE, hd]; slot is a flat token address written at
# [slot // BLOCK_SIZE, :, slot % BLOCK_SIZE] (positions only drive the rotation).
@triton.jit
def _rotate(src, cos, sin, offs, mask, half):
    # rows of src [heads, hd] -> (first halves, second halves) rotated, fp32 [heads, HALF_BLOCK]
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + offs, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin   # out[i] = x[i] c - x[i + hd/2] s, and its pair


@triton.jit
def _rope_store_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                          stride_qkv, stride_cos, stride_sin, stride_qn, stride_qh,
                          stride_ks, stride_kh, stride_kl, stride_vs, stride_vh, stride_vl,
                          NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_KVH: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    half = HEAD_DIM // 2
    offs = tl.arange(0, HALF_BLOCK)
    d_mask = offs < half
    pos = tl.load(pos_ptr + row)
    c = tl.load(cos_ptr + pos * stride_cos + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_sin + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    src = qkv_ptr + row * stride_qkv
    if tl.program_id(1) == 0:
        heads = tl.arange(0, BLOCK_H)
        q_mask = (heads < NUM_HEADS)[:, None] & d_mask[None, :]
        q1, q2 = _rotate(src + heads[:, None] * HEAD_DIM, c, s, offs[None, :], q_mask, half)
        q_dst = q_ptr + row * stride_qn + heads[:, None] * stride_qh + offs[None, :]
        tl.store(q_dst, q1.to(q_ptr.dtype.element_ty), mask=q_mask)
        tl.store(q_dst + half, q2.to(q_ptr.dtype.element_ty), mask=q_mask)
    else:
        kvh = tl.arange(0, BLOCK_KVH)
        mask = (kvh < NUM_KV_HEADS)[:, None] & d_mask[None, :]
        slot = tl.load(slot_ptr + row)  # int64: slot * stride may exceed 2**31
        blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        o1, o2 = _rotate(src + (NUM_HEADS + kvh)[:, None] * HEAD_DIM, c, s, offs[None, :], mask, half)
        kdst = k_ptr + blk * stride_ks + off * stride_kl + kvh[:, None] * stride_kh + offs[None, :]
        tl.store(kdst, o1.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(kdst + half, o2.to(k_ptr.dtype.element_ty), mask=mask)
        # value heads: copied unrotated, both halves
        vsrc = src + (NUM_HEADS + NUM_KV_HEADS + kvh)[:, None] * HEAD_DIM + offs[None, :]
        vdst = v_ptr + blk * stride_vs + off * stride_vl + kvh[:, None] * stride_vh + offs[None, :]
        tl.store(vdst, tl.load(vsrc, mask=mask, other=0.0).to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(vdst + half, tl.load(vsrc + half, mask=mask, other=0.0).to(v_ptr.dtype.element_ty),
                 mask=mask)


def rope_supported(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                   num_kv_heads: int) -> bool:
    hd = k_cache.shape[-1]
    return (qkv.dim() == 2 and hd % 2 == 0 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * hd
            and cos.shape[-1] == hd // 2 and sin.shape[-1] == hd // 2
            and _last_dim_contiguous(qkv, cos, sin, k_cache, v_cache))


def rope_paged_supported(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                         num_kv_heads: int) -> bool:
    bs = k_cache.shape[2] if k_cache.dim() == 4 else 0
    return (rope_supported(qkv, cos, sin, k_cache, v_cache, num_heads, num_kv_heads)
            and bs > 0 and bs & (bs - 1) == 0 and k_cache.shape == v_cache.shape)


def rope_launch_config(num_heads: int, num_kv_heads: int, hd: int, block_size: int) -> tuple[dict, int]:
    """(constexprs, num_warps) of the rope kernel: the q program's tile is [H, hd/2] twice, one
    warp per 512 elements of it (llama-8b: 4 warps), 1 to 8."""
    half, block_h = triton.next_power_of_2(hd // 2), triton.next_power_of_2(num_heads)
    consts = dict(NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=hd, HALF_BLOCK=half,
                  BLOCK_H=block_h, BLOCK_KVH=triton.next_power_of_2(num_kv_heads), BLOCK_SIZE=block_size)
    return consts, max(1, min(8, block_h * half // 512))


def _launch_rope(qkv, cos, sin, positions, slots, k_cache, v_cache, num_heads, num_kv_heads, out,
                 block_size):
    n = qkv.shape[0]
    hd = k_cache.shape[-1]
    if out is None:
        out = torch.empty((n, num_heads, hd), dtype=qkv.dtype, device=qkv.device)
    consts, num_warps = rope_launch_config(num_heads, num_kv_heads, hd, block_size)
    grid = (n, 2)
    launch(
        _rope_store_kv_kernel, grid,
        qkv, cos, sin, positions, slots, out, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_warps=num_warps, **consts)
    return out


def rope_store_kv_paged(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        positions: torch.Tensor, slot_mapping: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                        num_kv_heads: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    # qkv [N, (H + 2 KVH) hd] -> q [N, H, hd]; caches [num_blocks, KVH, BS, hd]; writes
    # k/v_cache[slot // BS, :, slot % BS, :] for slot = slot_mapping[n] (int64)
    return _launch_rope(qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, num_heads,
                        num_kv_heads, out, block_size=k_cache.shape[2])
