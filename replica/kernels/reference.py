"""Pure-torch reference implementations of the decode hot-path ops.

Contract (shared with the Triton kernels in `fused.py` / `attention.py`, dispatched by
`replica.kernels`):
- Same signatures, shapes and dtypes as the public ops; outputs have the input's dtype, all math
  (norm statistics, rotations, softmax, silu) runs in fp32 and is rounded once at the end.
- `add_rms_norm` writes the sum into `residual` in place and returns it as `new_residual`
  (both backends do, so engine code that aliases buffers behaves the same on CPU and GPU).
- CUDA-graph capturable on CUDA: no host syncs, no `.item()`, shapes depend only on input shapes.
  The attention reference materialises [B, KVH, L, hd] gathers, O(L) on CUDA; on CPU (never
  captured) it reads max(seq_lens) on the host and cuts L to it. The CPU path and the test oracle,
  not a fast path.
- `decode_attention` never lets cache rows at or beyond `seq_lens[b]` influence the result, even
  if they hold NaN/inf (an uninitialised `torch.empty` KV pool).
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x [N, D], weight [D] -> [N, D] in x.dtype
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # residual <- x + residual (rounded to residual.dtype), normed = rms_norm(residual)
    residual.add_(x)
    return rms_norm(residual, weight, eps), residual


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up [N, 2I] -> [N, I]: silu(gate) * up
    inter = gate_up.shape[-1] // 2
    gate = gate_up[:, :inter].float()
    up = gate_up[:, inter:].float()
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [N, heads, hd] (fp32), cos/sin [N, 1, hd/2]: HF rotate_half convention (non-interleaved)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_store_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, slot_ids: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    # qkv [N, (H + 2*KVH) * hd]; cos/sin [L, hd/2] fp32; positions/slot_ids [N] int64;
    # caches [S, KVH, L, hd]. Returns rotated q [N, H, hd]; writes cache[slot, :, pos, :].
    n = qkv.shape[0]
    hd = k_cache.shape[-1]
    h, kvh = num_heads, num_kv_heads
    q = qkv[:, : h * hd].view(n, h, hd).float()
    k = qkv[:, h * hd: (h + kvh) * hd].view(n, kvh, hd).float()
    v = qkv[:, (h + kvh) * hd: (h + 2 * kvh) * hd].view(n, kvh, hd)
    c = cos[positions].unsqueeze(1)  # [N, 1, hd/2]
    s = sin[positions].unsqueeze(1)
    # Advanced indices separated by a slice: the indexed view is [N, KVH, hd].
    k_cache[slot_ids, :, positions] = _rotate(k, c, s).to(k_cache.dtype)
    v_cache[slot_ids, :, positions] = v.to(v_cache.dtype)
    return _rotate(q, c, s).to(qkv.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_ids: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    # q [B, H, hd]; caches [S, KVH, L, hd]; slot_ids/seq_lens [B] -> out [B, H, hd] in q.dtype
    b, h, hd = q.shape
    kvh, max_len = k_cache.shape[1], k_cache.shape[2]
    if not q.is_cuda:  # CPU: a host read is free and keeps short sequences from paying for all of L
        max_len = int(seq_lens.max())
        k_cache, v_cache = k_cache[:, :, :max_len], v_cache[:, :, :max_len]
    group = h // kvh
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None]  # [B, L]
    mask = valid[:, None, :, None]                                               # [B, 1, L, 1]
    # Zero rows past seq_len so stale or NaN cache contents cannot leak in through 0 * NaN.
    k = torch.where(mask, k_cache[slot_ids].float(), 0.0)  # [B, KVH, L, hd]
    v = torch.where(mask, v_cache[slot_ids].float(), 0.0)
    qg = q.float().view(b, kvh, group, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, KVH, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)                             # [B, KVH, G, hd]
    return out.reshape(b, h, hd).to(q.dtype)
