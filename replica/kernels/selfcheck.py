"""Triton-vs-reference checks on small shapes, for Triton's CPU interpreter and for a real GPU.

    TRITON_INTERPRET=1 python -m replica.kernels.selfcheck        # CPU (tests/unit/test_kernels.py)
    python -m replica.kernels.selfcheck --device cuda              # on a GPU

Prints one JSON object {check name: "ok" | error message} and exits 1 if any check failed.
Every check calls the Triton wrappers directly (not the dispatcher, which picks the reference on
CPU), poisons outputs, unused cache rows and attention scratch with NaN so unwritten or
over-read elements show up, and compares with `reference.py` (rel. error <= 1e-5 in fp32).
Triton 3.6's interpreter computes tl.dot wrongly for bf16 inputs, so under TRITON_INTERPRET the
attention checks are meaningful in float32/float16 only; bf16 is checked on a GPU.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Callable

import torch

import replica.kernels  # noqa: F401  (applies the interpreter shim when TRITON_INTERPRET=1)
from replica.kernels import attention, fused, reference

NAN = float("nan")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|; inf if `actual` has a NaN/inf where `expected` is finite."""
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def _check(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    err = rel_err(actual, expected)
    if not err <= TOL[dtype]:
        raise AssertionError(f"{name}: rel err {err:.3g} > {TOL[dtype]:.0e}")


def rope_tables(max_len: int, hd: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # cos/sin [L, hd/2] fp32, Llama frequencies (theta 10000)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def check_norms(device, dtype, n: int, d: int, row_stride: int) -> None:
    g = torch.Generator().manual_seed(n * 1000 + d)
    big = torch.randn(n, row_stride, generator=g).to(device, dtype)
    x = big[:, :d]  # row stride > D exercises the stride argument
    w = torch.randn(d, generator=g).to(device, dtype)
    res = torch.randn(n, d, generator=g).to(device, dtype)
    out = torch.full((n, d), NAN, dtype=dtype, device=device)
    _check("rms_norm", fused.rms_norm(x, w, 1e-6, out=out), reference.rms_norm(x, w, 1e-6), dtype)
    r_tri, r_ref = res.clone(), res.clone()
    out = torch.full((n, d), NAN, dtype=dtype, device=device)
    normed, new_res = fused.add_rms_norm(x, r_tri, w, 1e-5, out=out)
    exp_normed, exp_res = reference.add_rms_norm(x, r_ref, w, 1e-5)
    assert new_res.data_ptr() == r_tri.data_ptr(), "add_rms_norm must update residual in place"
    _check("add_rms_norm.residual", r_tri, exp_res, dtype)
    _check("add_rms_norm.normed", normed, exp_normed, dtype)


def check_silu(device, dtype, n: int, inter: int) -> None:
    g = torch.Generator().manual_seed(n * 7 + inter)
    gate_up = (3 * torch.randn(n, 2 * inter, generator=g)).to(device, dtype)
    out = torch.full((n, inter), NAN, dtype=dtype, device=device)
    _check("silu_mul", fused.silu_mul(gate_up, out=out), reference.silu_mul(gate_up), dtype)


def check_rope(device, dtype, h: int, kvh: int, hd: int, prefill: bool) -> None:
    n, slots_total, max_len = (6, 4, 32) if prefill else (3, 7, 32)
    g = torch.Generator().manual_seed(h * 100 + kvh * 10 + hd + prefill)
    qkv = torch.randn(n, (h + 2 * kvh) * hd, generator=g).to(device, dtype)
    cos, sin = rope_tables(max_len, hd, device)
    if prefill:  # one sequence, consecutive positions, one slot
        positions = torch.arange(9, 9 + n, device=device)
        slots = torch.full((n,), 2, dtype=torch.int64, device=device)
    else:        # decode batch: non-contiguous slots, arbitrary positions incl. 0 and L-1
        positions = torch.tensor([0, 17, max_len - 1], device=device)
        slots = torch.tensor([5, 0, 3], device=device)
    caches = [torch.full((slots_total, kvh, max_len, hd), NAN, dtype=dtype, device=device)
              for _ in range(4)]
    out = torch.full((n, h, hd), NAN, dtype=dtype, device=device)
    q = fused.rope_store_kv(qkv, cos, sin, positions, slots, caches[0], caches[1], h, kvh, out=out)
    q_ref = reference.rope_store_kv(qkv, cos, sin, positions, slots, caches[2], caches[3], h, kvh)
    _check("rope.q", q, q_ref, dtype)
    for name, tri, ref in (("k", caches[0], caches[2]), ("v", caches[1], caches[3])):
        if not torch.equal(tri.isnan(), ref.isnan()):
            raise AssertionError(f"rope.{name}_cache: written positions differ from reference")
        _check(f"rope.{name}_cache", tri[slots, :, positions], ref[slots, :, positions], dtype)


def check_attention(device, dtype, h: int, kvh: int, hd: int, max_len: int, lens: list[int],
                    split: int | None, block_n: int | None) -> None:
    b, slots_total = len(lens), len(lens) + 3
    g = torch.Generator().manual_seed(h * 1000 + hd * 10 + max_len + b)
    q = torch.randn(b, h, hd, generator=g).to(device, dtype)
    k_cache = torch.randn(slots_total, kvh, max_len, hd, generator=g).to(device, dtype)
    v_cache = torch.randn(slots_total, kvh, max_len, hd, generator=g).to(device, dtype)
    slots = torch.randperm(slots_total, generator=g)[:b].to(device)  # non-contiguous slots
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=device)
    for i, n in enumerate(lens):  # rows past seq_len must never be read
        k_cache[slots[i], :, n:] = NAN
        v_cache[slots[i], :, n:] = NAN
    out = torch.full((b, h, hd), NAN, dtype=dtype, device=device)
    scale = 1.0 / math.sqrt(hd)
    saved, attention._empty = attention._empty, _nan_empty  # poison the split scratch
    try:
        o = attention.decode_attention(q, k_cache, v_cache, slots, seq_lens, scale, out=out,
                                       split=split, block_n=block_n)
    finally:
        attention._empty = saved
    _check("decode_attention", o, reference.decode_attention(q, k_cache, v_cache, slots,
                                                             seq_lens, scale), dtype)


def _nan_empty(shape, dtype, device):
    return torch.full(shape, NAN, dtype=dtype, device=device)


def checks(device: str, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """Named checks; names are stable (tests parametrize over them)."""
    a = check_attention
    return {
        "rms_norm.n1": lambda: check_norms(device, dtype, 1, 64, 64),
        "rms_norm.n5_d100_strided": lambda: check_norms(device, dtype, 5, 100, 128),
        "silu_mul.n1_i48": lambda: check_silu(device, dtype, 1, 48),
        "silu_mul.n3_i2100": lambda: check_silu(device, dtype, 3, 2100),
        "rope.decode_gqa_hd16": lambda: check_rope(device, dtype, 4, 2, 16, prefill=False),
        "rope.prefill_gqa_hd16": lambda: check_rope(device, dtype, 4, 2, 16, prefill=True),
        "rope.decode_mha_hd128": lambda: check_rope(device, dtype, 2, 2, 128, prefill=False),
        "rope.prefill_hd24": lambda: check_rope(device, dtype, 3, 1, 24, prefill=True),
        "attn.b1_direct": lambda: a(device, dtype, 4, 2, 16, 64, [37], None, None),
        "attn.gqa4_direct_len1_full": lambda: a(device, dtype, 8, 2, 16, 64, [1, 64, 33], None, None),
        "attn.gqa2_splits": lambda: a(device, dtype, 4, 2, 16, 64, [1, 64, 33, 17], 16, 16),
        "attn.mha_splits_ragged_L": lambda: a(device, dtype, 2, 2, 16, 200, [200, 1, 129], 64, 32),
        "attn.many_splits_chunks": lambda: a(device, dtype, 4, 1, 32, 512, [512, 300, 5], 16, 16),
        "attn.hd128_gqa4": lambda: a(device, dtype, 8, 2, 128, 96, [96, 40], 32, 16),
        "attn.hd80_group1_padded": lambda: a(device, dtype, 3, 3, 80, 48, [48, 2], 16, 16),
        "attn.group8_default": lambda: a(device, dtype, 16, 2, 64, 128, [128, 65, 1], None, None),
    }


def run(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str]:
    results = {}
    for name, fn in checks(device, dtype).items():
        try:
            fn()
            results[name] = "ok"
        except Exception as e:  # report every failure, not just the first
            results[name] = f"{type(e).__name__}: {e}"[:2000]
    return results


def main(argv: list[str]) -> int:
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    dtype = getattr(torch, argv[argv.index("--dtype") + 1]) if "--dtype" in argv else torch.float32
    results = run(device, dtype)
    print(json.dumps(results))
    return 0 if all(v == "ok" for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
