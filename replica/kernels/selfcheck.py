"""Triton-vs-reference checks on small shapes, for Triton's CPU interpreter and for a real GPU.

    TRITON_INTERPRET=1 python -m replica.kernels.selfcheck        # CPU (tests/unit/test_kernels.py)
    python -m replica.kernels.selfcheck --device cuda              # on a GPU

Prints one JSON object {check name: "ok" | error message} and exits 1 if any check failed.
Every check calls the Triton wrappers directly (not the dispatcher, which picks the reference on
CPU), poisons outputs, unused cache rows and attention scratch with NaN so unwritten or
over-read elements show up, and compares with `reference.py` (rel. error <= 1e-5 in fp32).
Triton 3.6's interpreter computes tl.dot wrongly for bf16 inputs, so under TRITON_INTERPRET the
attention checks are meaningful in float32/float16 only; bf16 is checked on a GPU.
Paged checks (`paged_case`): shuffled block ids, a shared prefix block, NaN in every cache entry
no sequence reads and in the block that table entries past a sequence's end name; rope_paged also
checks that exactly the addressed cache rows were written; prefill cases cover decode rows,
cached prefixes, ragged head groups and tiles split into key segments (partials poisoned too).
"""
from __future__ import annotations

import json
import math
import sys
from typing import Callable

import torch

import replica.kernels  # noqa: F401  (applies the interpreter shim when TRITON_INTERPRET=1)
from replica.kernels import fused, paged_attention, paged_prefill, reference, sample
from replica.kernels.prefill_meta import PrefillMeta

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


def check_qk_norm(device, dtype, n: int, h: int, kvh: int, hd: int) -> None:
    g = torch.Generator().manual_seed(n * 31 + h * 7 + hd)
    qkv = (3 * torch.randn(n, (h + 2 * kvh) * hd, generator=g)).to(device, dtype)
    qw, kw = (torch.randn(hd, generator=g).to(device, dtype) for _ in range(2))
    tri, ref = qkv.clone(), qkv.clone()
    assert fused.qk_rms_norm_(tri, qw, kw, h, kvh, 1e-6).data_ptr() == tri.data_ptr(), "must work in place"
    _check("qk_rms_norm_", tri, reference.qk_rms_norm_(ref, qw, kw, h, kvh, 1e-6), dtype)
    assert torch.equal(tri[:, (h + kvh) * hd:], qkv[:, (h + kvh) * hd:]), "values must stay untouched"


def check_silu(device, dtype, n: int, inter: int) -> None:
    g = torch.Generator().manual_seed(n * 7 + inter)
    gate_up = (3 * torch.randn(n, 2 * inter, generator=g)).to(device, dtype)
    out = torch.full((n, inter), NAN, dtype=dtype, device=device)
    _check("silu_mul", fused.silu_mul(gate_up, out=out), reference.silu_mul(gate_up), dtype)


def _nan_empty(shape, dtype, device):
    return torch.full(shape, NAN, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------- paged
def paged_case(g: torch.Generator, lens: list[int], bs: int, max_blocks: int, kvh: int, hd: int,
               dtype, device, share: bool = True):
    """Random paged caches for sequences of `lens` tokens: shuffled block ids (block 0, the
    engine's scratch block, is never assigned), sequence 1 shares sequence 0's full leading blocks
    when `share` (prefix cache), two blocks nobody references, and a spare table row. Every cache
    entry no sequence reads is NaN; table entries past a sequence's blocks name a NaN block.
    Returns (k_cache, v_cache, block_tables int32 [len(lens) + 1, max_blocks], table_rows [B])."""
    need = [-(-n // bs) for n in lens]
    shared = min(lens[0], lens[1]) // bs if share and len(lens) > 1 else 0
    num_blocks = 1 + sum(need) - shared + 2
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    poison_block = ids.pop()  # referenced only by table entries past a sequence's end
    tables = torch.full((len(lens) + 1, max_blocks), poison_block, dtype=torch.int32)
    for i, nb in enumerate(need):
        assert nb <= max_blocks
        for j in range(nb):
            tables[i, j] = tables[0, j] if (i == 1 and j < shared) else ids.pop()
    order = torch.randperm(len(lens) + 1, generator=g)  # table row of sequence i: order[i]
    tables = tables[torch.argsort(order)]
    rows = order[: len(lens)]
    read = torch.zeros(num_blocks, bs, dtype=torch.bool)
    for i, n in enumerate(lens):
        for p in range(n):
            read[tables[rows[i], p // bs], p % bs] = True
    caches = []
    for _ in range(2):
        c = torch.randn(num_blocks, kvh, bs, hd, generator=g)
        c[~read[:, None, :, None].expand_as(c)] = NAN
        caches.append(c.to(device, dtype))
    return caches[0], caches[1], tables.to(device), rows.to(device)


def check_rope_paged(device, dtype, h: int, kvh: int, hd: int, bs: int, prefill: bool) -> None:
    n, num_blocks, max_pos = (bs + 3, 5, 64) if prefill else (4, 6, 64)
    g = torch.Generator().manual_seed(h * 100 + kvh * 10 + hd + bs + prefill)
    qkv = torch.randn(n, (h + 2 * kvh) * hd, generator=g).to(device, dtype)
    cos, sin = rope_tables(max_pos, hd, device)
    if prefill:  # one sequence: consecutive positions, a run of slots that crosses a block edge
        positions = torch.arange(7, 7 + n, device=device)
        slots = (3 * bs - 2 + torch.arange(n)).to(device)  # blocks 2, 3, 4
    else:        # decode rows: arbitrary positions incl. 0, slots in shuffled blocks and offsets
        positions = torch.tensor([0, 17, max_pos - 1, 5], device=device)
        slots = torch.tensor([5 * bs + bs - 1, 2 * bs, 1 * bs + 3, 4 * bs + 1], device=device)
    caches = [torch.full((num_blocks, kvh, bs, hd), NAN, dtype=dtype, device=device)
              for _ in range(4)]
    out = torch.full((n, h, hd), NAN, dtype=dtype, device=device)
    q = fused.rope_store_kv_paged(qkv, cos, sin, positions, slots, caches[0], caches[1], h, kvh,
                                  out=out)
    q_ref = reference.rope_store_kv_paged(qkv, cos, sin, positions, slots, caches[2], caches[3],
                                          h, kvh)
    _check("rope_paged.q", q, q_ref, dtype)
    blk, off = slots // bs, slots % bs
    for name, tri, ref in (("k", caches[0], caches[2]), ("v", caches[1], caches[3])):
        if not torch.equal(tri.isnan(), ref.isnan()):
            raise AssertionError(f"rope_paged.{name}_cache: written entries differ from reference")
        if int((~tri.isnan()).sum()) != n * kvh * hd:
            raise AssertionError(f"rope_paged.{name}_cache: wrote more than the addressed rows")
        _check(f"rope_paged.{name}_cache", tri[blk, :, off], ref[blk, :, off], dtype)


def check_paged_decode(device, dtype, h: int, kvh: int, hd: int, bs: int, max_blocks: int,
                       lens: list[int], split: int | None, block_n: int | None,
                       programs: int | None = None, combine: str | None = None) -> None:
    g = torch.Generator().manual_seed(h * 1000 + hd * 10 + bs + len(lens))
    k_cache, v_cache, tables, rows = paged_case(g, lens, bs, max_blocks, kvh, hd, dtype, device)
    b = len(lens)
    q = torch.randn(b, h, hd, generator=g).to(device, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=device)
    out = torch.full((b, h, hd), NAN, dtype=dtype, device=device)
    scale = 1.0 / math.sqrt(hd)
    saved, paged_attention._empty = paged_attention._empty, _nan_empty  # poison the split scratch
    try:
        o = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, rows, seq_lens,
                                                   scale, out=out, split=split, block_n=block_n,
                                                   programs=programs, combine=combine)
    finally:
        paged_attention._empty = saved
    _check("paged_decode_attention", o, reference.paged_decode_attention(
        q, k_cache, v_cache, tables, rows, seq_lens, scale), dtype)


def check_paged_prefill(device, dtype, h: int, kvh: int, hd: int, bs: int, max_blocks: int,
                        chunks: list[tuple[int, int]], tile_tokens: int,
                        segment: int | None = None, tile_rows: int | None = None) -> None:
    """chunks: (q_len, cached prefix length) each; kv_len = prefix + q_len. `segment` splits
    tiles into key segments of that many keys (None: the default rule, no split at these sizes);
    `tile_rows` fixes the tile's matmul rows (the tall tiles' stacking, also in fp32 and the interpreter)."""
    g = torch.Generator().manual_seed(h * 1000 + hd * 10 + bs + len(chunks))
    q_lens = [ql for ql, _ in chunks]
    kv_lens = [ql + pre for ql, pre in chunks]
    k_cache, v_cache, tables, rows = paged_case(g, kv_lens, bs, max_blocks, kvh, hd, dtype, device)
    meta = PrefillMeta.build(q_lens, kv_lens, rows.tolist(), device, tile_tokens=tile_tokens,
                             segment=segment)
    if segment is not None and not meta.num_prefill_merges + meta.num_decode_merges:
        raise AssertionError("case meant to split tiles into key segments has none")
    t = sum(q_lens)
    q = torch.randn(t, h, hd, generator=g).to(device, dtype)
    out = torch.full((t, h, hd), NAN, dtype=dtype, device=device)
    scale = 1.0 / math.sqrt(hd)
    saved, paged_attention._empty = paged_attention._empty, _nan_empty  # poison the partials
    try:
        o = paged_prefill.paged_prefill_attention(q, k_cache, v_cache, tables, meta, scale,
                                                  out=out, **({"rows": tile_rows} if tile_rows else {}))
    finally:
        paged_attention._empty = saved
    _check("paged_prefill_attention", o, reference.paged_prefill_attention(
        q, k_cache, v_cache, tables, meta, scale), dtype)


# --------------------------------------------------------------------------------------------- sampler
def _sampler_case(device, dtype, B: int, V: int, params: list, ties: bool):
    """Tables for `params` in shuffled rows (the scratch row too), logits [B, V] in `dtype`
    (multiples of 1/4 when `ties`: many exactly equal values at every cut)."""
    from replica.sampling import SamplingTables
    g = torch.Generator().manual_seed(B * 7 + V + ties)
    tables = SamplingTables(B + 2, V, torch.device(device))
    rows = torch.randperm(B + 2, generator=g)[:B]
    tables.write(rows.tolist(), params, [1000 + 37 * i for i in range(B)], [[1, 2, 3]] * B,
                 [[4, 4, 5]] * B, [(6,)] * B)
    logits = 2 * torch.randn(B, V, generator=g)
    if ties:
        logits = (logits * 4).round() / 4
    steps = torch.arange(B) % 3
    return tables, logits.to(device, dtype), rows.to(device), steps.to(device)


def _threshold_tokens(tables, x: torch.Tensor, rows, steps) -> list[int]:
    """The draw by its definition: keep s = x / T at or above the larger of the k-th largest s,
    the nucleus edge (the first sorted value whose cumulative probability reaches top_p) and
    max s + ln(min_p); the race's winner over the kept tokens (argmax temperature 0)."""
    from replica.sampling import uniform_noise
    out = []
    V = x.shape[1]
    for b in range(x.shape[0]):
        r = int(rows[b])
        temp, top_p, min_p = (float(v) for v in tables.floats[r, :3])
        top_k = int(tables.ints[r, 0])
        if temp <= 0:
            out.append(int(x[b].argmax()))
            continue
        s = x[b] / max(temp, 1e-5)
        desc = s.double().sort(descending=True).values
        p = torch.softmax(desc, 0)
        tau = float(desc[min(top_k, V) - 1]) if top_k > 0 else -math.inf
        n = int((p.cumsum(0) < top_p).sum()) if top_p < 1 else V - 1
        tau = max(tau, float(desc[min(n, V - 1)]), float(desc[0]) + math.log(min_p) if min_p > 0 else -math.inf)
        u = uniform_noise(tables.ints[r:r + 1, 1].cpu(), steps[b:b + 1].cpu(), torch.arange(V)[None])[0]
        key = torch.where(s.cpu() >= tau, s.cpu() - torch.log(-torch.log(u)), -math.inf)
        out.append(int(key.argmax()))
    return out


def check_sampler(device, dtype, B: int, V: int, params: list, ties: bool = False) -> None:
    """Penalties, tokens and logprobs of the kernels against `SamplingTables.full_torch` (the
    torch sampler); with ties, tokens against the draw's definition (`_threshold_tokens`), since
    the sort breaks exact ties at a cut by position and the kernels keep every tied token."""
    from replica.graphs import StepOutputs
    tables, logits, rows, steps = _sampler_case(device, dtype, B, V, params, ties)
    ref = StepOutputs(B, torch.device(device))
    tables.full_torch(logits, rows, steps, ref.view(B))
    x = tables._add_bias_and_bans_(logits.to(torch.float32, copy=True), rows, steps)
    sample.apply_penalties_(x, rows, tables.floats, tables.counts, tables.prompt_seen)
    _check("sample.penalties", x.nan_to_num(neginf=-1e30),
           tables.processed(logits.float(), rows, steps).nan_to_num(neginf=-1e30), torch.float32)
    got = StepOutputs(B, torch.device(device))
    got.top_ids.fill_(-7)
    sample.draw(x, rows, steps, tables.floats, tables.ints, got.tokens[:B])
    want = _threshold_tokens(tables, x, rows, steps) if ties else ref.tokens[:B].tolist()
    assert got.tokens[:B].tolist() == want, f"tokens {got.tokens[:B].tolist()} != {want}"
    if ties:
        return
    sample.top_logprobs(logits, rows, tables.ints, got.tokens[:B], got.logprob[:B], got.top_logprobs[:B],
                        got.top_ids[:B])
    for b, p in enumerate(params):
        if p.logprobs is None:
            assert (got.top_ids[b] == -7).all(), "a row without logprobs must be left alone"
            continue
        _check("sample.logprob", got.logprob[b], ref.logprob[b], torch.float32)
        _check("sample.top_logprobs", got.top_logprobs[b], ref.top_logprobs[b], torch.float32)
        ids = got.top_ids[b]        # equal logits may come in either order: check what each id holds
        assert len(set(ids.tolist())) == len(ids), f"row {b}: repeated top ids"
        _check("sample.top_ids", torch.log_softmax(logits[b].float(), 0)[ids], ref.top_logprobs[b], torch.float32)


def _sampler_rows() -> list:
    from replica.sampling_params import SamplingParams as P
    return [P(temperature=0.0), P(temperature=1.0), P(temperature=0.7, top_p=0.5),
            P(temperature=1.0, top_k=5, logprobs=3), P(temperature=1.5, min_p=0.05, repetition_penalty=1.3,
                                                        presence_penalty=0.5, frequency_penalty=0.3),
            P(temperature=1.0, top_p=0.9, top_k=50, logit_bias=((3, 5.0), (9, -100.0)), logprobs=20),
            P(temperature=0.0, logprobs=0, repetition_penalty=1.5), P(temperature=2.0, top_k=1),
            P(temperature=1.0, top_p=1e-6), P(temperature=1.0, min_p=1.0), P(temperature=0.3, top_k=3, top_p=0.2),
            P(temperature=1.0, min_tokens=2, top_k=10_000)]


def checks(device: str, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """Named checks; names are stable (tests parametrize over them)."""
    pd, pp = check_paged_decode, check_paged_prefill
    return {
        "rms_norm.n1": lambda: check_norms(device, dtype, 1, 64, 64),
        "rms_norm.n5_d100_strided": lambda: check_norms(device, dtype, 5, 100, 128),
        "qk_norm.gqa_hd128": lambda: check_qk_norm(device, dtype, 3, 4, 2, 128),
        "qk_norm.mha_hd80": lambda: check_qk_norm(device, dtype, 2, 3, 3, 80),
        "silu_mul.n1_i48": lambda: check_silu(device, dtype, 1, 48),
        "sampler.rows_v700": lambda: check_sampler(device, dtype, 12, 700, _sampler_rows()),
        "sampler.rows_v2500_tiles": lambda: check_sampler(device, dtype, 12, 2500, _sampler_rows()),
        "sampler.ties_v700": lambda: check_sampler(device, dtype, 12, 700, _sampler_rows(), ties=True),
        "sampler.rows_v17000_splits": lambda: check_sampler(device, dtype, 12, 2 * sample.SPLIT + 616,
                                                            _sampler_rows()),
        "silu_mul.n3_i2100": lambda: check_silu(device, dtype, 3, 2100),
        "rope_paged.decode_gqa_hd16_bs8": lambda: check_rope_paged(device, dtype, 4, 2, 16, 8, False),
        "rope_paged.prefill_gqa_hd16_bs16": lambda: check_rope_paged(device, dtype, 4, 2, 16, 16, True),
        "rope_paged.decode_mha_hd128_bs32": lambda: check_rope_paged(device, dtype, 2, 2, 128, 32, False),
        "rope_paged.prefill_hd24_bs8": lambda: check_rope_paged(device, dtype, 3, 1, 24, 8, True),
        # (H, KVH, hd, BS, max_blocks, lens, split, block_n)
        "paged_decode.bs16_gqa4_edges": lambda: pd(device, dtype, 8, 2, 16, 16, 6,
                                                   [1, 15, 16, 17, 70], None, None),
        "paged_decode.bs8_mha_hd64_tile_spans_blocks": lambda: pd(device, dtype, 2, 2, 64, 8, 6,
                                                                  [8, 7, 9, 1, 40], 32, 32),
        "paged_decode.bs32_gqa4_hd128_tile_in_block": lambda: pd(device, dtype, 8, 2, 128, 32, 4,
                                                                 [33, 31, 100], 64, 16),
        "paged_decode.one_split_direct": lambda: pd(device, dtype, 4, 2, 32, 16, 4,
                                                    [64, 1, 20], 64, 16),
        "paged_decode.many_splits_chunks": lambda: pd(device, dtype, 4, 1, 32, 8, 40,
                                                      [320, 300, 9], 16, 16),
        "paged_decode.hd80_group3": lambda: pd(device, dtype, 6, 2, 80, 16, 3, [48, 2, 17], 16, 16),
        "paged_decode.group8_default": lambda: pd(device, dtype, 16, 2, 64, 16, 8,
                                                  [128, 65, 1], None, None),
        # persistent grid: fewer programs than work items, each walking several (empty ones too)
        "paged_decode.persistent_many_splits": lambda: pd(device, dtype, 4, 2, 32, 8, 40,
                                                          [320, 300, 9, 1], 16, 16, programs=5),
        "paged_decode.persistent_one_split_group3": lambda: pd(device, dtype, 6, 2, 80, 16, 3,
                                                               [48, 2, 17], 64, 16, programs=2),
        # the per-row combine (B x H >= COMBINE_ROWS_MIN_PROGRAMS picks it): heads padded to a
        # power of two (6 -> 8), rows of one split (skipped) and of many (walked one at a time)
        "paged_decode.combine_rows_many_splits": lambda: pd(device, dtype, 6, 2, 80, 8, 40,
                                                            [320, 16, 300, 9, 1], 16, 16,
                                                            combine="rows"),
        "paged_decode.combine_rows_group8_default": lambda: pd(device, dtype, 16, 2, 64, 16, 8,
                                                               [128, 65, 1, 100], 64, None,
                                                               combine="rows"),
        # (H, KVH, hd, BS, max_blocks, [(q_len, cached prefix)], tile_tokens)
        "paged_prefill.bs16_gqa4_mixed": lambda: pp(device, dtype, 8, 2, 16, 16, 6, [
            (1, 40), (3, 0), (21, 11), (37, 0), (1, 0), (5, 16)], 8),
        "paged_prefill.bs8_mha_hd64": lambda: pp(device, dtype, 2, 2, 64, 8, 8, [
            (9, 0), (1, 7), (17, 30), (2, 6)], 8),
        "paged_prefill.bs32_gqa4_hd128_default_tiles": lambda: pp(device, dtype, 8, 2, 128, 32, 3, [
            (40, 33), (1, 64), (33, 0)], 32),
        # tall tiles (16-bit, 64 < hd <= 128: 256 rows at 16 warps; `prefill_tile_tokens`)
        "paged_prefill.bs16_gqa4_hd128_tall_tiles": lambda: pp(device, dtype, 8, 2, 128, 16, 14, [
            (130, 0), (1, 64), (70, 100), (64, 0), (2, 5)], 64, tile_rows=256),
        "paged_prefill.gqa2_hd128_tall_tiles_segments": lambda: pp(device, dtype, 4, 2, 128, 16, 24, [
            (200, 130), (1, 5), (129, 0)], 128, 128, tile_rows=256),
        "paged_prefill.group7_hd128_tall_tiles": lambda: pp(device, dtype, 14, 2, 128, 16, 10, [
            (100, 30), (1, 20), (65, 0)], 64, tile_rows=256),
        "paged_prefill.hd80_group3": lambda: pp(device, dtype, 6, 2, 80, 16, 4, [
            (16, 15), (1, 1), (19, 0)], 8),
        "paged_prefill.group8_head_groups": lambda: pp(device, dtype, 16, 2, 32, 16, 5, [
            (35, 40), (1, 50)], 32),
        "paged_prefill.group5_ragged_head_groups": lambda: pp(device, dtype, 10, 2, 16, 8, 6, [
            (20, 9), (1, 30), (2, 0)], 16),
        "paged_prefill.key_segments": lambda: pp(device, dtype, 8, 2, 32, 16, 12, [
            (5, 130), (1, 150), (1, 127), (16, 120), (2, 0), (1, 3), (8, 60)], 8, 64),
        "paged_prefill.key_segments_mha_bs32": lambda: pp(device, dtype, 2, 2, 64, 32, 8, [
            (40, 200), (1, 64), (3, 61)], 32, 64),
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
