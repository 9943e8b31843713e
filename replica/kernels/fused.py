"""Triton kernels for the element-wise ops: rms_norm, add_rms_norm, silu_mul, rope_store_kv_paged.

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
    _rms_norm_kernel[(n,)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), d,
                           eps, HAS_RESIDUAL=residual is not None, BLOCK_D=block,
                           num_warps=warps)
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
    _silu_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block,
                           num_warps=4 if block >= 512 else 1)
    return out


# ----------------------------------------------------------------------------------------------
# rope_store_kv_paged: grid (N, H + KVH). Program (n, j): j < H rotates q head j into q_out;
# j >= H rotates k head j-H into the k cache and copies v head j-H into the v cache. In qkv the k
# head kh lives at column (H + kh) * hd, i.e. at j * hd, like the q heads. The caches are paged
# [num_blocks, KVH, BLOCK_SIZE, hd]; slot is a flat token address written at
# [slot // BLOCK_SIZE, :, slot % BLOCK_SIZE] (positions only drive the rotation).
@triton.jit
def _rope_store_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                          stride_qkv, stride_cos, stride_sin, stride_qn, stride_qh,
                          stride_ks, stride_kh, stride_kl, stride_vs, stride_vh, stride_vl,
                          NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = HEAD_DIM // 2
    offs = tl.arange(0, HALF_BLOCK)
    mask = offs < half
    pos = tl.load(pos_ptr + row)
    c = tl.load(cos_ptr + pos * stride_cos + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_sin + offs, mask=mask, other=0.0).to(tl.float32)
    src = qkv_ptr + row * stride_qkv + head * HEAD_DIM
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + offs, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c - x2 * s   # out[i]        = x[i] c[i] - x[i + hd/2] s[i]
    o2 = x2 * c + x1 * s   # out[i + hd/2] = x[i + hd/2] c[i] + x[i] s[i]
    if head < NUM_HEADS:
        dst = q_ptr + row * stride_qn + head * stride_qh
        tl.store(dst + offs, o1.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half + offs, o2.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        kvh = head - NUM_HEADS
        slot = tl.load(slot_ptr + row)  # int64: slot * stride may exceed 2**31
        blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        kdst = k_ptr + blk * stride_ks + kvh * stride_kh + off * stride_kl
        tl.store(kdst + offs, o1.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(kdst + half + offs, o2.to(k_ptr.dtype.element_ty), mask=mask)
        # v head kvh: copied unrotated, both halves
        vsrc = qkv_ptr + row * stride_qkv + (NUM_HEADS + NUM_KV_HEADS + kvh) * HEAD_DIM
        vdst = v_ptr + blk * stride_vs + kvh * stride_vh + off * stride_vl
        v1 = tl.load(vsrc + offs, mask=mask, other=0.0)
        v2 = tl.load(vsrc + half + offs, mask=mask, other=0.0)
        tl.store(vdst + offs, v1.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(vdst + half + offs, v2.to(v_ptr.dtype.element_ty), mask=mask)


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


def _launch_rope(qkv, cos, sin, positions, slots, k_cache, v_cache, num_heads, num_kv_heads, out,
                 block_size):
    n = qkv.shape[0]
    hd = k_cache.shape[-1]
    if out is None:
        out = torch.empty((n, num_heads, hd), dtype=qkv.dtype, device=qkv.device)
    half_block = triton.next_power_of_2(hd // 2)
    grid = (n, num_heads + num_kv_heads)
    _rope_store_kv_kernel[grid](
        qkv, cos, sin, positions, slots, out, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=hd, HALF_BLOCK=half_block,
        BLOCK_SIZE=block_size, num_warps=1 if half_block <= 64 else 2)
    return out


def rope_store_kv_paged(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        positions: torch.Tensor, slot_mapping: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                        num_kv_heads: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    # qkv [N, (H + 2 KVH) hd] -> q [N, H, hd]; caches [num_blocks, KVH, BS, hd]; writes
    # k/v_cache[slot // BS, :, slot % BS, :] for slot = slot_mapping[n] (int64)
    return _launch_rope(qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, num_heads,
                        num_kv_heads, out, block_size=k_cache.shape[2])
