"""Decode hot-path ops for the Llama engine, each dispatched to a Triton kernel or a torch reference.

Public ops (signatures are the engine's contract; shapes in the comments of `reference.py`):
    rms_norm(x, weight, eps)                          -> normed
    add_rms_norm(x, residual, weight, eps)            -> (normed, new_residual)  # residual updated in place
    silu_mul(gate_up)                                 -> silu(gate) * up
    rope_store_kv(qkv, cos, sin, positions, slot_ids, k_cache, v_cache, num_heads, num_kv_heads) -> q
    decode_attention(q, k_cache, v_cache, slot_ids, seq_lens, scale) -> out
    use_triton(t) -> bool                             # True when t is on CUDA and triton imports

Dispatch: the Triton kernel (`fused.py`, `attention.py`) when `use_triton(x)` and the kernel
supports the shapes, else `reference.py`. Reference fallbacks on CUDA: attention with head_dim < 16
or > 256 (the tiny test model's hd=16 is supported), H % KVH != 0, or any tensor whose last dim is
not contiguous; norms with rows longer than 65536; rope with odd head_dim. Every path is CUDA-graph
capturable (no host syncs, shape-only launch parameters); run each op once before capture so
Triton compiles outside it.
"""
from __future__ import annotations

import os

import torch

from replica.kernels import reference

try:
    if os.environ.get("TRITON_INTERPRET") == "1":
        from replica.kernels import _interpreter
        _interpreter.patch()
    from replica.kernels import attention as _attention
    from replica.kernels import fused as _fused
    HAS_TRITON = True
except ImportError:  # no triton (e.g. a minimal CPU install): reference only
    _attention = _fused = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "add_rms_norm", "decode_attention", "rms_norm", "rope_store_kv",
           "silu_mul", "use_triton"]


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x) and _fused.norm_supported(x, weight):
        return _fused.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if (use_triton(x) and _fused.norm_supported(x, weight)
            and _fused.norm_supported(residual, weight)):
        return _fused.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate_up) and _fused.silu_mul_supported(gate_up):
        return _fused.silu_mul(gate_up)
    return reference.silu_mul(gate_up)


def rope_store_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, slot_ids: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    args = (qkv, cos, sin, positions, slot_ids, k_cache, v_cache, num_heads, num_kv_heads)
    if use_triton(qkv) and _fused.rope_supported(qkv, cos, sin, k_cache, v_cache, num_heads,
                                                 num_kv_heads):
        return _fused.rope_store_kv(*args)
    return reference.rope_store_kv(*args)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_ids: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    if use_triton(q) and _attention.supported(q, k_cache, v_cache):
        return _attention.decode_attention(q, k_cache, v_cache, slot_ids, seq_lens, scale)
    return reference.decode_attention(q, k_cache, v_cache, slot_ids, seq_lens, scale)


# Paged ops (TEMPORARY: torch references until the Triton kernels land).
from replica.kernels.paged_tmp import (PrefillMeta, paged_decode_attention,  # noqa: E402,F401
                                       paged_prefill_attention, rope_store_kv_paged)
