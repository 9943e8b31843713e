"""Hot-path ops for the Llama engine, each dispatched to a Triton kernel or a torch reference.

Public ops (signatures are the engine's contract; shapes in the comments of `reference.py`):
    rms_norm(x, weight, eps)                          -> normed
    add_rms_norm(x, residual, weight, eps)            -> (normed, new_residual)  # residual updated in place
    silu_mul(gate_up)                                 -> silu(gate) * up
    qk_rms_norm_(qkv, q_weight, k_weight, H, KVH, eps) -> qkv  # per-head q/k norm (Qwen3), in place
    use_triton(t) -> bool                             # True when t is on CUDA and triton imports
    prefetch_compile_key() -> thread | None           # start-up: Triton key and driver, in background
    compile_ahead(fn) -> seconds                      # start-up: run fn with every Triton launch
                                                      #   compiled on a thread pool instead (launch.py)
  Paged KV cache (k/v_cache [num_blocks, KVH, BS, hd], BS a power of two; token p of block-table
  row r at cache[block_tables[r, p // BS], :, p % BS]; block_tables int32 [R, max_blocks]):
    rope_store_kv_paged(qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, num_heads,
                        num_kv_heads, out=None) -> q   # k/v of token n to flat slot slot_mapping[n]
    paged_decode_attention(q, k_cache, v_cache, block_tables, table_rows, seq_lens, scale) -> out
        # q [B, H, hd]; row b attends positions 0..seq_lens[b]-1 of table row table_rows[b]
    paged_prefill_attention(q, k_cache, v_cache, block_tables, meta, scale, out=None) -> out
        # q [T, H, hd]: chunks back to back, causal with a cached prefix; meta = PrefillMeta.build(
        #   q_lens, kv_lens, table_rows, device, tile_tokens=...) once per step (prefill_meta.py)
    prefill_tile_tokens(dtype, head_dim, group) -> int  # the tile_tokens for a model layout

Dispatch: the Triton kernel (`fused.py`, `paged_attention.py`, `paged_prefill.py`) when
`use_triton(x)` and the kernel supports the shapes, else `reference.py`. Reference fallbacks on
CUDA: attention with head_dim < 16 or > 256 (the tiny test model's hd=16 is supported), H % KVH
not 0, a block size that is not a power of two, or any tensor whose last dim is not contiguous (for
the paged decode also non-contiguous table_rows / seq_lens); norms with rows longer than 65536;
rope with odd head_dim. Every op except `paged_prefill_attention` (eager by design: its launch grid
follows the step's tile map) is CUDA-graph capturable (no host syncs, shape-only launch
parameters); run each op once before capture so Triton compiles outside it.
`paged_decode_attention` compiles one kernel pair per model shape for every batch size and max_len
(its split is a runtime argument).
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch

from replica.kernels import reference
from replica.kernels.prefill_meta import TILE_TOKENS, PrefillMeta  # torch only: the reference uses it too

try:
    if os.environ.get("TRITON_INTERPRET") == "1":
        from replica.kernels import _interpreter
        _interpreter.patch()
    from replica.kernels import fused as _fused
    from replica.kernels import paged_attention as _paged
    from replica.kernels import paged_prefill as _paged_prefill
    HAS_TRITON = True
except ImportError:  # no triton (e.g. a minimal CPU install): reference only
    _fused = _paged = _paged_prefill = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "PrefillMeta", "add_rms_norm", "compile_ahead", "paged_decode_attention",
           "paged_prefill_attention", "prefetch_compile_key", "prefill_tile_tokens", "qk_rms_norm_", "rms_norm", "rope_store_kv_paged",
           "silu_mul", "use_triton"]


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda


def compile_ahead(fn) -> float:
    """Run `fn` once with every Triton launch only compiled, the compiles in parallel
    (replica/kernels/launch.py); afterwards the same launches run without compiling. 0.0 and
    `fn` not run without Triton. Seconds."""
    if not HAS_TRITON:
        return 0.0
    from replica.kernels.launch import compile_ahead as ahead
    return ahead(fn)


def prefetch_compile_key() -> Optional[threading.Thread]:
    """Start Triton's once-per-process start-up work in a background thread; join it before the
    first kernel launch. A process's first compile (a disk-cache hit included) hashes Triton's
    sources and its ~0.5 GB libtriton (0.33 s on an H200 host, results/startup-*.json), and its
    first launch builds Triton's CUDA driver module, a C compile with an empty Triton cache.
    hashlib and the C compiler run without the GIL, so both overlap device init and weight
    loading. None without Triton."""
    if not HAS_TRITON:
        return None
    try:
        from triton.runtime.cache import triton_key          # Triton 3.x; memoized per process
        from triton.runtime.driver import driver
    except ImportError:
        return None

    def build_driver() -> None:
        try:
            driver.active.utils                 # builds (or loads) the driver module once
        except Exception:                       # no GPU driver here: the first launch will say so
            pass

    def warm() -> None:                         # the two side by side: 0.9 and 0.5 s on a fresh host
        side = threading.Thread(target=build_driver, name="graphserve-triton-driver", daemon=True)
        side.start()
        triton_key()
        side.join()
    thread = threading.Thread(target=warm, name="graphserve-triton-key", daemon=True)
    thread.start()
    return thread


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


def qk_rms_norm_(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int,
                 num_kv_heads: int, eps: float) -> torch.Tensor:
    if use_triton(qkv) and _fused.qk_norm_supported(qkv, q_weight, k_weight):
        return _fused.qk_rms_norm_(qkv, q_weight, k_weight, num_heads, num_kv_heads, eps)
    return reference.qk_rms_norm_(qkv, q_weight, k_weight, num_heads, num_kv_heads, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate_up) and _fused.silu_mul_supported(gate_up):
        return _fused.silu_mul(gate_up)
    return reference.silu_mul(gate_up)


def rope_store_kv_paged(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        positions: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    args = (qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, num_heads, num_kv_heads)
    if use_triton(qkv) and _fused.rope_paged_supported(qkv, cos, sin, k_cache, v_cache, num_heads,
                                                       num_kv_heads) and _rows_out(out):
        return _fused.rope_store_kv_paged(*args, out=out)
    return _into(out, reference.rope_store_kv_paged(*args))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, table_rows: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    args = (q, k_cache, v_cache, block_tables, table_rows, seq_lens, scale)
    if use_triton(q) and _paged.supported(q, k_cache, v_cache, block_tables, table_rows, seq_lens):
        return _paged.paged_decode_attention(*args)
    return reference.paged_decode_attention(*args)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, meta: PrefillMeta, scale: float,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    args = (q, k_cache, v_cache, block_tables, meta, scale)
    if use_triton(q) and _paged.supported(q, k_cache, v_cache, block_tables) and _rows_out(out):
        return _paged_prefill.paged_prefill_attention(*args, out=out)
    return _into(out, reference.paged_prefill_attention(*args))


def prefill_tile_tokens(dtype: torch.dtype, head_dim: int, group: int) -> int:
    """Query tokens per prefill tile for a layout of head_dim and G = H / KVH query heads per KV
    head: what the Triton kernel runs fastest (paged_prefill.py); TILE_TOKENS without Triton (the
    reference takes any)."""
    if not HAS_TRITON:
        return TILE_TOKENS
    return _paged_prefill.prefill_tile_tokens(dtype, head_dim, group)


def _rows_out(out: Optional[torch.Tensor]) -> bool:
    """An `out` the Triton kernels can write: None, or rows of a [N, H, hd] buffer with a
    contiguous last dim (they take its row and head strides)."""
    return out is None or (out.dim() == 3 and out.stride(-1) == 1)


def _into(out: Optional[torch.Tensor], result: torch.Tensor) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out
