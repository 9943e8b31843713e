"""Build, load and launch benchmarks/cuda_decode_attention.cu (a probe kernel) from Python.

No extension build and no new dependency: nvcc (on the GPU image) compiles the .cu to a cubin
for sm_90a, cached by source and flags under ~/.cache/graphserve/cuda; the driver API, through
ctypes, loads it as a context-independent library (cuLibraryLoadData, so a green context's
stream can launch it too) and launches it on torch's current stream, so CUDA graphs capture it.

`decode_attention(...)` has the contract of `replica.kernels.paged_attention.paged_decode_attention`
for the shapes the .cu takes (head_dim 128, block size 16, H / KVH <= 8, bf16 / fp16): the same
split rule (`decode_plan`), the same scratch layout, and the engine's Triton combine kernel merges
the partials (`combine_plan`). `programs` sets the persistent grid (CTAs); by default every SM
gets as many CTAs as fit. Raises RuntimeError with the driver's error name on any failure.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from contextlib import nullcontext
from functools import lru_cache
from typing import Optional

import torch

from replica.kernels import paged_attention as PA
from replica.kernels.launch import launch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_decode_attention.cu")
ROW_BYTES = (128 + 8) * 2          # the .cu's padded smem row
TILE_BYTES = 16 * ROW_BYTES        # one K or V tile of 16 tokens
MAX_DYNAMIC_SMEM = 8               # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_ARG_PTRS = ("q", "k", "v", "bt", "rows", "lens", "out", "po", "pm", "pl", "smids")
_ARG_INTS = ("split", "num_splits", "batch", "kv_heads", "group")
_ARG_STRIDES = ("sqb", "sqh", "skb", "skh", "skn", "svb", "svh", "svn", "sbt", "sob", "soh")


class _Args(ctypes.Structure):
    """The .cu's `struct Args`, field for field (natural alignment on both sides)."""
    _fields_ = ([(n, ctypes.c_void_p) for n in _ARG_PTRS] + [("qk_scale", ctypes.c_float)]
                + [(n, ctypes.c_int) for n in _ARG_INTS] + [(n, ctypes.c_int64) for n in _ARG_STRIDES])


@lru_cache(maxsize=None)
def _driver() -> ctypes.CDLL:
    cu = ctypes.CDLL("libcuda.so.1")
    cu.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    cu.cuLibraryLoadData.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
    cu.cuKernelSetAttribute.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    return cu


def _check(res: int, what: str) -> None:
    if res != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(res, ctypes.byref(name))
        raise RuntimeError(f"{what}: {name.value.decode() if name.value else res}")


def smem_bytes(warps: int, stages: int) -> int:
    """Dynamic shared memory of one CTA: each warp's ring of `stages` K and V tiles."""
    return warps * stages * 2 * TILE_BYTES


def _flags(dtype: torch.dtype, warps: int, stages: int, bulk: bool, evict_first: bool) -> list[str]:
    return ([f"-DWARPS={warps}", f"-DSTAGES={stages}", f"-DCTAS={ctas_per_sm(warps, stages)}",
             f"-DBULK={int(bulk)}", f"-DEVICT_FIRST={int(evict_first)}"]
            + (["-DUSE_HALF"] if dtype == torch.float16 else []))


@lru_cache(maxsize=None)
def build(dtype: torch.dtype, warps: int, stages: int, bulk: bool = False,
          evict_first: bool = False) -> tuple[bytes, str]:
    """(cubin, ptxas report) for one variant; compiled once per source and flags."""
    src = open(SOURCE, "rb").read()
    flags = ["-cubin", "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-Xptxas", "-v",
             *_flags(dtype, warps, stages, bulk, evict_first)]
    key = hashlib.sha256(src + " ".join(flags).encode()).hexdigest()[:20]
    root = os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache"))
    cache = os.path.join(root, "graphserve", "cuda")
    os.makedirs(cache, exist_ok=True)
    cubin, report = os.path.join(cache, key + ".cubin"), os.path.join(cache, key + ".txt")
    if not os.path.exists(cubin):
        done = subprocess.run(["nvcc", *flags, "-o", cubin + ".tmp", SOURCE], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nvcc failed:\n{done.stderr[-3000:]}")
        open(report, "w").write(done.stderr)
        os.replace(cubin + ".tmp", cubin)
    return open(cubin, "rb").read(), open(report).read()


@lru_cache(maxsize=None)
def kernel(dtype: torch.dtype, warps: int, stages: int, bulk: bool, evict_first: bool) -> ctypes.c_void_p:
    """The loaded CUkernel, with its dynamic shared memory limit raised for device 0."""
    cu = _driver()
    torch.cuda.init()
    image, _ = build(dtype, warps, stages, bulk, evict_first)
    lib, kern, dev = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_int()
    _check(cu.cuLibraryLoadData(ctypes.byref(lib), image, None, None, 0, None, None, 0), "cuLibraryLoadData")
    _check(cu.cuLibraryGetKernel(ctypes.byref(kern), lib, b"decode_attention"), "cuLibraryGetKernel")
    _check(cu.cuDeviceGet(ctypes.byref(dev), torch.cuda.current_device()), "cuDeviceGet")
    _check(cu.cuKernelSetAttribute(MAX_DYNAMIC_SMEM, smem_bytes(warps, stages), kern, dev.value),
           "cuKernelSetAttribute")
    _LIBS.append(lib)
    return kern


_LIBS: list = []          # loaded libraries stay loaded for the process


def ctas_per_sm(warps: int, stages: int) -> int:
    """CTAs one SM holds by shared memory (228 KB per SM, 1 KB reserved per CTA), at most 16 warps
    in all: the kernel is compiled for that many CTAs (ptxas caps its registers to fit, 128 per
    thread at 16 warps, which it uses uncapped)."""
    by_smem = (228 * 1024) // (smem_bytes(warps, stages) + 1024)
    return max(1, min(by_smem, 16 // warps))


def fits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    h, hd = q.shape[1], q.shape[2]
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    return (hd == 128 and bs == 16 and h % kvh == 0 and h // kvh <= 8
            and q.dtype in (torch.bfloat16, torch.float16)
            and all(c.stride(2) == 128 and c.stride(3) == 1 for c in (k_cache, v_cache)))  # contiguous rows


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, table_rows: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, out: Optional[torch.Tensor] = None, programs: Optional[int] = None,
                     warps: int = 8, stages: int = 3, bulk: bool = False, evict_first: bool = False,
                     smids: Optional[torch.Tensor] = None,
                     stream: Optional[torch.cuda.Stream] = None) -> torch.Tensor:
    # q [B, H, 128] -> out [B, H, 128]; block_tables int32, table_rows / seq_lens int64 (as the
    # engine passes them); smids [programs] int32 receives each CTA's SM (a check of placement)
    assert fits(q, k_cache, v_cache), \
        "the probe kernel takes head_dim 128, block size 16, H / KVH <= 8, 16-bit, contiguous rows"
    assert k_cache.stride() == v_cache.stride(), "the kernel reads V with K's strides"
    assert block_tables.dtype == torch.int32 and table_rows.dtype == seq_lens.dtype == torch.int64
    bsz, h, hd = q.shape
    kvh = k_cache.shape[1]
    rt, _ = PA.decode_plan(bsz, h, kvh, hd, 16, block_tables.shape[1], q.dtype)
    split, num_splits = rt["split"], rt["num_splits"]
    out = torch.empty_like(q) if out is None else out
    if num_splits == 1:
        po = pm = pl = torch.empty(1, dtype=torch.float32, device=q.device)
    else:
        po = torch.empty((bsz, h, num_splits, hd), dtype=torch.float32, device=q.device)
        pm = torch.empty((bsz, h, num_splits), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    programs = programs or ctas_per_sm(warps, stages) * sms
    tensors = (q, k_cache, v_cache, block_tables, table_rows, seq_lens, out, po, pm, pl)
    args = _Args(*[t.data_ptr() for t in tensors], smids.data_ptr() if smids is not None else None,
                 scale * PA.LOG2E, split, num_splits, bsz, kvh, h // kvh,
                 q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                 v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
                 out.stride(0), out.stride(1))
    params = (ctypes.c_void_p * 1)(ctypes.addressof(args))
    handle = (stream or torch.cuda.current_stream()).cuda_stream
    fn = kernel(q.dtype, warps, stages, bulk, evict_first)
    _check(_driver().cuLaunchKernel(fn, programs, 1, 1, warps * 32, 1, 1, smem_bytes(warps, stages),
                                    handle, params, None), "cuLaunchKernel")
    if num_splits > 1:
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            kern, grid, meta, warps = PA.combine_plan(bsz, h, hd)
            launch(kern, grid, po, pm, pl, seq_lens, out, split, num_splits, out.stride(0),
                   out.stride(1), num_warps=warps, **meta)
    return out

