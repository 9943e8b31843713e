"""Decode kernels: reference ops vs plain float64 oracles; Triton kernels vs reference in Triton's CPU
interpreter (a subprocess running `python -m replica.kernels.selfcheck` with TRITON_INTERPRET=1,
which must be set before triton is imported).

Paged KV ops: the references against float64 oracles that gather token by token through the block
table (block sizes 8/16/32, GQA groups 1/2/4, hd 16/64/128, shuffled block ids, a block shared by
two sequences, lengths 1, BS-1, BS, BS+1 and 5*BS+3); every cache entry no sequence reads is NaN
and table entries past a sequence's blocks hold an out-of-range id, so reading either would show.
PrefillMeta's tile map and key segments: test_prefill_meta.py.

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


# ---------------------------------------------------------------- paged KV cache: inputs and oracles
GARBAGE_BLOCK = 10**6  # table entries past a sequence's blocks: would raise if ever indexed


def make_paged(lens, bs, kvh, hd, max_blocks, share=True, seed=0):
    """Caches [NB, KVH, BS, hd] holding sequences of `lens` tokens in shuffled blocks; block 0 (the
    engine's scratch block) and two more blocks are never referenced; sequence 1 reuses sequence
    0's full leading blocks when `share` (a cached prefix). Every entry no sequence reads is NaN.
    Returns k_cache, v_cache, tables (int32 [B + 2, max_blocks], two spare rows), rows [B]."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    need = [-(-n // bs) for n in lens]
    shared = min(lens[0], lens[1]) // bs if share and b > 1 else 0
    num_blocks = 3 + sum(need) - shared
    free = (3 + torch.randperm(num_blocks - 3, generator=g)).tolist()  # ids 0..2 never used
    rows = torch.randperm(b + 2, generator=g)[:b]                      # non-contiguous table rows
    tables = torch.full((b + 2, max_blocks), GARBAGE_BLOCK, dtype=torch.int32)
    for i in range(b):
        for j in range(need[i]):
            tables[rows[i], j] = tables[rows[0], j] if (i == 1 and j < shared) else free.pop()
    k_cache = torch.full((num_blocks, kvh, bs, hd), NAN)
    v_cache = torch.full((num_blocks, kvh, bs, hd), NAN)
    for i, n in enumerate(lens):
        for p in range(n):
            blk, off = int(tables[rows[i], p // bs]), p % bs
            if k_cache[blk, :, off].isnan().any():  # shared entries: written once
                k_cache[blk, :, off] = torch.randn(kvh, hd, generator=g)
                v_cache[blk, :, off] = torch.randn(kvh, hd, generator=g)
    return k_cache, v_cache, tables, rows


def oracle_paged_keys(cache, table_row, n, bs):  # [n, KVH, hd] float64, token by token
    return torch.stack([cache[int(table_row[p // bs]), :, p % bs].double() for p in range(n)])


def oracle_softmax_attend(q_vec, keys, values, scale):  # q [hd], keys/values [n, hd] -> [hd]
    s = keys @ q_vec.double() * scale
    p = torch.exp(s - s.max())
    return (p / p.sum()) @ values


def oracle_paged_decode(q, k_cache, v_cache, tables, rows, lens, scale):
    b, h, hd = q.shape
    bs, group = k_cache.shape[2], h // k_cache.shape[1]
    out = torch.empty(b, h, hd, dtype=torch.float64)
    for i in range(b):
        keys = oracle_paged_keys(k_cache, tables[rows[i]], int(lens[i]), bs)
        values = oracle_paged_keys(v_cache, tables[rows[i]], int(lens[i]), bs)
        for j in range(h):
            out[i, j] = oracle_softmax_attend(q[i, j], keys[:, j // group], values[:, j // group],
                                              scale)
    return out


def oracle_paged_prefill(q, k_cache, v_cache, tables, q_lens, kv_lens, rows, scale):
    t, h, hd = q.shape
    bs, group = k_cache.shape[2], h // k_cache.shape[1]
    out = torch.empty(t, h, hd, dtype=torch.float64)
    start = 0
    for q_len, kv_len, row in zip(q_lens, kv_lens, rows):
        keys = oracle_paged_keys(k_cache, tables[row], kv_len, bs)
        values = oracle_paged_keys(v_cache, tables[row], kv_len, bs)
        for i in range(q_len):
            visible = kv_len - q_len + i + 1  # prefix + causal within the chunk
            for j in range(h):
                out[start + i, j] = oracle_softmax_attend(
                    q[start + i, j], keys[:visible, j // group], values[:visible, j // group], scale)
        start += q_len
    return out


# ---------------------------------------------------------------- paged references vs oracles
@pytest.mark.parametrize("n,h,kvh,hd,bs,prefill", [
    (1, 4, 2, 16, 8, False), (5, 8, 2, 64, 16, False), (3, 2, 2, 128, 32, False),
    (19, 4, 1, 16, 16, True),  # a run of slots across a block edge
])
def test_rope_store_kv_paged_reference(n, h, kvh, hd, bs, prefill):
    num_blocks, max_pos = 6, 40
    qkv = torch.randn(n, (h + 2 * kvh) * hd)
    cos, sin = rope_tables(max_pos, hd)
    if prefill:
        positions = torch.arange(3, 3 + n)
        slots = 2 * bs + 5 + torch.arange(n)
    else:  # positions and slots unrelated: RoPE follows positions, the address follows slots
        positions = torch.randint(0, max_pos, (n,))
        slots = torch.randperm(num_blocks * bs)[:n]
    k_cache = torch.full((num_blocks, kvh, bs, hd), NAN)
    v_cache = torch.full((num_blocks, kvh, bs, hd), NAN)
    q = ref.rope_store_kv_paged(qkv, cos, sin, positions, slots, k_cache, v_cache, h, kvh)
    assert q.shape == (n, h, hd)
    written = torch.zeros(num_blocks, bs, dtype=torch.bool)
    for i in range(n):
        p, blk, off = int(positions[i]), int(slots[i]) // bs, int(slots[i]) % bs
        heads = qkv[i].view(h + 2 * kvh, hd)
        assert_close(q[i], oracle_rope(heads[:h], cos[p], sin[p]))
        assert_close(k_cache[blk, :, off], oracle_rope(heads[h:h + kvh], cos[p], sin[p]))
        assert torch.equal(v_cache[blk, :, off], heads[h + kvh:])
        written[blk, off] = True
    assert k_cache.isnan().all(dim=(1, 3)).eq(~written).all()  # nothing else touched
    assert v_cache.isnan().all(dim=(1, 3)).eq(~written).all()


def _edge_lens(bs):
    return [1, bs - 1, bs, bs + 1, 5 * bs + 3]


@pytest.mark.parametrize("bs,h,kvh,hd", [
    (8, 4, 4, 16), (16, 8, 2, 16), (16, 4, 1, 64), (32, 8, 2, 128), (16, 32, 8, 128),
])
def test_paged_decode_attention_reference(bs, h, kvh, hd):
    lens = _edge_lens(bs)
    max_blocks = 7
    k_cache, v_cache, tables, rows = make_paged(lens, bs, kvh, hd, max_blocks, seed=bs + h)
    q = torch.randn(len(lens), h, hd)
    seq_lens = torch.tensor(lens)
    scale = 1 / math.sqrt(hd)
    out = ref.paged_decode_attention(q, k_cache, v_cache, tables, rows, seq_lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, oracle_paged_decode(q, k_cache, v_cache, tables, rows, seq_lens, scale))


def test_paged_decode_reference_cuda_style_full_table_gather():
    """The CUDA branch gathers all max_blocks blocks (no host read); on CPU it is reached by
    slicing nothing off, i.e. a max length that fills the table: same answer."""
    bs, lens = 8, [1, 7, 8, 9, 24]
    k_cache, v_cache, tables, rows = make_paged(lens, bs, 2, 16, 3)
    q, seq_lens = torch.randn(5, 4, 16), torch.tensor(lens)
    out = ref.paged_decode_attention(q, k_cache, v_cache, tables, rows, seq_lens, 0.25)
    assert_close(out, oracle_paged_decode(q, k_cache, v_cache, tables, rows, seq_lens, 0.25))


# chunks: (q_len, cached prefix); kv_len = prefix + q_len. Decode rows are (1, context - 1).
PREFILL_CASES = [
    (8, 4, 4, 16, [(1, 0), (3, 0), (13, 0), (8, 8)]),
    (16, 8, 2, 16, [(1, 40), (3, 0), (21, 11), (37, 0), (1, 0), (5, 16)]),
    (16, 4, 1, 64, [(16, 0), (17, 15), (1, 16)]),
    (32, 8, 2, 128, [(40, 33), (1, 64), (31, 1)]),
]


@pytest.mark.parametrize("bs,h,kvh,hd,chunks", PREFILL_CASES)
def test_paged_prefill_attention_reference(bs, h, kvh, hd, chunks):
    q_lens = [ql for ql, _ in chunks]
    kv_lens = [ql + pre for ql, pre in chunks]
    max_blocks = max(-(-n // bs) for n in kv_lens) + 1
    k_cache, v_cache, tables, rows = make_paged(kv_lens, bs, kvh, hd, max_blocks, seed=hd + bs)
    meta = K.PrefillMeta.build(q_lens, kv_lens, rows.tolist(), "cpu")
    q = torch.randn(sum(q_lens), h, hd)
    scale = 1 / math.sqrt(hd)
    out = ref.paged_prefill_attention(q, k_cache, v_cache, tables, meta, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, oracle_paged_prefill(q, k_cache, v_cache, tables, q_lens, kv_lens,
                                           rows.tolist(), scale))


def test_paged_prefill_decode_rows_equal_paged_decode():
    """A q_len-1 chunk is a decode row: both references agree on it."""
    bs, lens = 16, [33, 16, 1]
    k_cache, v_cache, tables, rows = make_paged(lens, bs, 2, 16, 3)
    q = torch.randn(3, 8, 16)
    meta = K.PrefillMeta.build([1, 1, 1], lens, rows.tolist(), "cpu")
    assert_close(ref.paged_prefill_attention(q, k_cache, v_cache, tables, meta, 0.3),
                 ref.paged_decode_attention(q, k_cache, v_cache, tables, rows, torch.tensor(lens),
                                            0.3))


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
    kc, vc, tables, rows = make_paged([9, 1], 8, 2, 16, 2)
    lens = torch.tensor([9, 1])
    assert torch.equal(K.paged_decode_attention(q, kc, vc, tables, rows, lens, 0.25),
                       ref.paged_decode_attention(q, kc, vc, tables, rows, lens, 0.25))
    meta = K.PrefillMeta.build([2, 1], [9, 1], rows.tolist(), "cpu")
    qp = torch.randn(3, 4, 16)
    assert torch.equal(K.paged_prefill_attention(qp, kc, vc, tables, meta, 0.25),
                       ref.paged_prefill_attention(qp, kc, vc, tables, meta, 0.25))
    qkv, (cos, sin) = torch.randn(2, 8 * 16), rope_tables(16, 16)
    pos, slots = torch.tensor([3, 9]), torch.tensor([17, 2])
    caches = [torch.full((3, 2, 8, 16), NAN) for _ in range(4)]
    q_k = K.rope_store_kv_paged(qkv, cos, sin, pos, slots, caches[0], caches[1], 4, 2)
    q_r = ref.rope_store_kv_paged(qkv, cos, sin, pos, slots, caches[2], caches[3], 4, 2)
    assert torch.equal(q_k, q_r)
    assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
               for a, b in zip(caches[:2], caches[2:]))


# ---------------------------------------------------------------- Triton interpreter vs reference
HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERP_DTYPES = ("float32", "float16")


@pytest.fixture(scope="module")
def interpreter_results():
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (it is in the [test] extras); interpreter checks skipped")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = {dtype: subprocess.Popen([sys.executable, "-m", "replica.kernels.selfcheck", "--dtype",
                                      dtype], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
             for dtype in INTERP_DTYPES}  # side by side: each is one single-threaded interpreter
    results = {}
    for dtype, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = stdout.strip().splitlines()
        assert lines, f"selfcheck ({dtype}) printed nothing; rc={proc.returncode}\n{stderr[-4000:]}"
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
    bad = {k: v for k, v in results.items() if v["spill_bytes"] > compile_check.spill_allowance(k)
           or not 0 < v["regs"] <= 255 or v["shared"] > 227 * 1024}
    assert not bad, bad
    assert compile_check.spill_allowance("paged_prefill.8b_bf16_bs16") > 0   # tall tiles
    assert compile_check.spill_allowance("paged_prefill_merge.8b_bf16_bs16") == 0
    assert compile_check.spill_allowance("paged_prefill.8b_fp32_bs16") == 0


@pytest.mark.parametrize("dtype, hd, group, tokens, block_m", [
    (torch.bfloat16, 128, 4, 64, 256),    # llama-8b: 64 tokens x 4 heads
    (torch.bfloat16, 128, 7, 64, 256),    # qwen2-7b: 4 of the 7 heads per program
    (torch.bfloat16, 128, 2, 128, 256),   # qwen3: 128 tokens x 2 heads (was 32 x 2 = 64 rows)
    (torch.float16, 128, 1, 128, 128),    # MHA: at most MAX_TILE_TOKENS tokens
    (torch.bfloat16, 64, 4, 32, 128),     # llama-1b: hd 64 keeps 128 rows (256 measured slower)
    (torch.bfloat16, 256, 2, 32, 64),     # hd 256: 64 rows, as before
    (torch.float32, 128, 4, 32, 32),      # fp32: 32 rows
])
def test_prefill_tiles_fill_the_rows_measured_for_their_layout(dtype, hd, group, tokens, block_m):
    """The runner passes `prefill_tile_tokens` to PrefillMeta.build; the kernel's config for that
    tile height has the rows results/prefill_tiles-*.json measured fastest for the layout."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (it is in the [test] extras)")
    from replica.kernels import paged_prefill as pp
    assert K.prefill_tile_tokens(dtype, hd, group) == tokens
    cfg = pp.prefill_config(dtype, hd, group, tokens)
    assert cfg["BLOCK_M"] == block_m
    assert cfg["HPP"] * cfg["NUM_HG"] >= group
