"""Decode kernels: reference ops vs plain float64 oracles; Triton kernels vs reference in Triton's CPU
interpreter (a subprocess running `python -m replica.kernels.selfcheck` with TRITON_INTERPRET=1,
which must be set before triton is imported).

The interpreter runs fp32 and fp16; its tl.dot is wrong for bf16 inputs (Triton 3.6), so bf16 is
checked on a GPU only (`python -m replica.kernels.selfcheck --device cuda --dtype bfloat16`).
Last, every kernel is compiled for sm_90 with Triton's bundled ptxas (no GPU needed) to catch
code the interpreter accepts but the GPU compiler rejects, and register spills.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import replica.kernels as K
from replica.kernels import reference as ref

ROOT = Path(__file__).resolve().parents[2]
NAN = float("nan")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def rope_tables(max_len: int, hd: int):  # cos/sin [L, hd/2] fp32, theta 10000
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float(), ang.sin().float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    err = rel_err(actual, expected)
    assert err <= tol, f"rel err {err:.3g} > {tol:.0e}"


# ---------------------------------------------------------------- float64 oracles, written plainly
def oracle_rms_norm(x, w, eps):
    out = torch.empty(x.shape, dtype=torch.float64)
    for i in range(x.shape[0]):
        row = x[i].double()
        out[i] = row / math.sqrt((row * row).mean().item() + eps) * w.double()
    return out


def oracle_silu_mul(gate_up):
    inter = gate_up.shape[1] // 2
    g, u = gate_up[:, :inter].double(), gate_up[:, inter:].double()
    return g / (1.0 + torch.exp(-g)) * u


def rotate_half(x):  # HF Llama convention
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def oracle_rope(x, cos_row, sin_row):  # x [heads, hd]; cos_row/sin_row [hd/2]
    c = torch.cat((cos_row, cos_row)).double()
    s = torch.cat((sin_row, sin_row)).double()
    return x.double() * c + rotate_half(x.double()) * s


def oracle_attention(q, k_cache, v_cache, slots, lens, scale):
    b, h, hd = q.shape
    group = h // k_cache.shape[1]
    out = torch.empty(b, h, hd, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        for j in range(h):
            k = k_cache[slots[i], j // group, :n].double()   # [n, hd]
            v = v_cache[slots[i], j // group, :n].double()
            s = k @ q[i, j].double() * scale                 # [n]
            p = torch.exp(s - s.max())
            out[i, j] = (p / p.sum()) @ v
    return out


# ---------------------------------------------------------------- reference vs oracle
@pytest.mark.parametrize("n,d", [(1, 64), (4, 100)])
def test_rms_norm_reference(n, d):
    x, w = torch.randn(n, d), torch.randn(d)
    assert_close(ref.rms_norm(x, w, 1e-6), oracle_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("n", [1, 3])
def test_add_rms_norm_reference_updates_residual_in_place(n):
    x, res, w = torch.randn(n, 64), torch.randn(n, 64), torch.randn(64)
    expected_res = x.double() + res.double()
    normed, new_res = ref.add_rms_norm(x, res, w, 1e-5)
    assert new_res is res
    assert_close(new_res, expected_res)
    assert_close(normed, oracle_rms_norm(expected_res, w, 1e-5))


def test_rms_norm_reference_bf16_rounds_once():
    x, w = torch.randn(3, 256).bfloat16(), torch.randn(256).bfloat16()
    assert ref.rms_norm(x, w, 1e-6).dtype == torch.bfloat16
    assert_close(ref.rms_norm(x, w, 1e-6), oracle_rms_norm(x, w, 1e-6), tol=1e-2)


@pytest.mark.parametrize("n,inter", [(1, 16), (5, 96)])
def test_silu_mul_reference(n, inter):
    gate_up = 4 * torch.randn(n, 2 * inter)
    assert_close(ref.silu_mul(gate_up), oracle_silu_mul(gate_up))


def _rope_case(n, h, kvh, hd, slots_total, max_len, prefill):
    qkv = torch.randn(n, (h + 2 * kvh) * hd)
    cos, sin = rope_tables(max_len, hd)
    if prefill:
        positions = torch.arange(5, 5 + n)
        slots = torch.full((n,), 1, dtype=torch.int64)
    else:
        positions = torch.randint(0, max_len, (n,))
        positions[0] = max_len - 1
        slots = torch.randperm(slots_total)[:n]
    return qkv, cos, sin, positions, slots


@pytest.mark.parametrize("n,h,kvh,hd,prefill", [
    (1, 4, 2, 16, False), (3, 4, 2, 16, False), (4, 8, 2, 64, False), (2, 2, 2, 128, False),
    (7, 4, 1, 16, True),
])
def test_rope_store_kv_reference(n, h, kvh, hd, prefill):
    slots_total, max_len = 6, 24
    qkv, cos, sin, pos, slots = _rope_case(n, h, kvh, hd, slots_total, max_len, prefill)
    k_cache = torch.full((slots_total, kvh, max_len, hd), NAN)
    v_cache = torch.full((slots_total, kvh, max_len, hd), NAN)
    q = ref.rope_store_kv(qkv, cos, sin, pos, slots, k_cache, v_cache, h, kvh)
    assert q.shape == (n, h, hd)
    written = torch.zeros(slots_total, max_len, dtype=torch.bool)
    for i in range(n):
        p, s = int(pos[i]), int(slots[i])
        heads = qkv[i].view(h + 2 * kvh, hd)
        assert_close(q[i], oracle_rope(heads[:h], cos[p], sin[p]))
        assert_close(k_cache[s, :, p], oracle_rope(heads[h:h + kvh], cos[p], sin[p]))
        assert torch.equal(v_cache[s, :, p], heads[h + kvh:])
        written[s, p] = True
    # nothing else in the caches was touched
    assert k_cache.isnan().all(dim=(1, 3)).eq(~written).all()
    assert v_cache.isnan().all(dim=(1, 3)).eq(~written).all()


@pytest.mark.parametrize("h,kvh,hd,lens", [
    (4, 4, 16, [1]),              # MHA, B=1, shortest
    (4, 2, 16, [24]),             # B=1, full L
    (8, 2, 16, [1, 24, 9, 13]),   # GQA group 4, len 1 and full
    (32, 8, 128, [3, 24]),        # llama-8b head layout
])
def test_decode_attention_reference(h, kvh, hd, lens):
    max_len, slots_total, b = 24, len(lens) + 4, len(lens)
    q = torch.randn(b, h, hd)
    k_cache, v_cache = torch.randn(2, slots_total, kvh, max_len, hd)
    slots = torch.randperm(slots_total)[:b]
    seq_lens = torch.tensor(lens)
    for i, n in enumerate(lens):  # stale/uninitialised rows past seq_len must not leak in
        k_cache[slots[i], :, n:] = NAN
        v_cache[slots[i], :, n:] = NAN
    out = ref.decode_attention(q, k_cache, v_cache, slots, seq_lens, 1 / math.sqrt(hd))
    assert_close(out, oracle_attention(q, k_cache, v_cache, slots, seq_lens, 1 / math.sqrt(hd)))


# ---------------------------------------------------------------- dispatcher on CPU
def test_dispatch_uses_reference_on_cpu():
    x, w = torch.randn(2, 32), torch.randn(32)
    assert not K.use_triton(x)
    assert torch.equal(K.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    gate_up = torch.randn(2, 64)
    assert torch.equal(K.silu_mul(gate_up), ref.silu_mul(gate_up))
    res_a = torch.randn(2, 32)
    res_b = res_a.clone()
    normed, new_res = K.add_rms_norm(x, res_a, w, 1e-6)
    assert new_res is res_a and torch.equal(normed, ref.add_rms_norm(x, res_b, w, 1e-6)[0])
    q = torch.randn(2, 4, 16)
    kc, vc = torch.randn(2, 3, 2, 8, 16)
    slots, lens = torch.tensor([2, 0]), torch.tensor([8, 1])
    assert torch.equal(K.decode_attention(q, kc, vc, slots, lens, 0.25),
                       ref.decode_attention(q, kc, vc, slots, lens, 0.25))


# ---------------------------------------------------------------- Triton interpreter vs reference
HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERP_DTYPES = ("float32", "float16")


@pytest.fixture(scope="module")
def interpreter_results():
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (it is in the [test] extras); interpreter checks skipped")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    results = {}
    for dtype in INTERP_DTYPES:
        proc = subprocess.run([sys.executable, "-m", "replica.kernels.selfcheck", "--dtype", dtype],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        lines = proc.stdout.strip().splitlines()
        assert lines, f"selfcheck ({dtype}) printed nothing; rc={proc.returncode}\n{proc.stderr[-4000:]}"
        results[dtype] = json.loads(lines[-1])
    return results


def _check_names():
    from replica.kernels import selfcheck
    return list(selfcheck.checks("cpu", torch.float32)) if HAVE_TRITON else ["skipped"]


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("name", _check_names())
def test_triton_kernel_matches_reference_in_interpreter(interpreter_results, dtype, name):
    assert interpreter_results[dtype][name] == "ok", interpreter_results[dtype][name]


# ---------------------------------------------------------------- GPU compile without a GPU
def test_triton_kernels_compile_for_hopper_without_spills():
    """The interpreter accepts code the GPU compiler may reject; compile every kernel config for
    sm_90 with Triton's bundled ptxas and check registers / shared memory."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (it is in the [test] extras)")
    from replica.kernels import compile_check
    if not os.access(os.path.join(compile_check._TOOLS, "ptxas"), os.X_OK):
        pytest.skip("this triton wheel has no runnable ptxas")
    results = compile_check.compile_all(arch=90)
    assert len(results) > 20
    bad = {k: v for k, v in results.items()
           if v["spill_bytes"] != 0 or not 0 < v["regs"] <= 255 or v["shared"] > 227 * 1024}
    assert not bad, bad
