"""Triton varlen causal prefill attention over the paged KV cache (mixed steps: prompt chunks and
1-token decode rows packed in one forward).

Contract: same semantics as `reference.paged_prefill_attention`; the cache layout, block tables,
K/V tiles and `supported` shapes are replica/kernels/paged_attention.py's, whose tile loader and
scratch allocator this module uses. Chunk lengths are validated on the host by `PrefillMeta.build`
and against the table width here.

Prefill (`paged_prefill_attention`, eager): per tile kind of the `PrefillMeta` tile map (prefill
tiles, decode tiles) one `_prefill_kernel` launch, grid (num_tiles, KVH * NUM_HG): one program per
tile (or key segment of a tile) and per group of HPP query heads of one KV head. The tile's query
tokens and heads are stacked in the tl.dot M dimension (row r = token r // HPP, head r % HPP: a
token's heads are adjacent in memory): prefill tiles are `prefill_tile_tokens` tokens x min(G, 4)
heads, 256 rows for 16-bit hd 128 (64 tokens x 4 heads for Llama-style G = 4, 128 x 2 for G = 2),
128 for hd 64 (32 x 4); decode tiles (q_len 1) are 1 token x G heads. Flash-attention
loop over the program's keys k0 .. k1 - 1 (keys above the tile's causal limit are never visited):
first the key tiles below p0 + 1 that every row sees (no masks), then the diagonal tiles with the
causal mask. Dead rows (past the tile's tokens or the group's heads) compute on zeros and are not
stored. A tile that `PrefillMeta` split into key segments (few, long tiles: a short chunk over a
long cached prefix) writes fp32 partials per segment, and `_prefill_merge_kernel`, grid
(split tiles, H), merges them; the others write the output directly. Two compiled attention
specialisations per model (prefill tiles, decode tiles) plus two small merge kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from replica.kernels import paged_attention as _pa   # _pa._empty: looked up per call, so a test's
#                                                     NaN-filling swap covers the partials here too
from replica.kernels.launch import launch
from replica.kernels.paged_attention import LOG2E, _load_kv_tile, _wide
from replica.kernels.prefill_meta import TILE_TOKENS, PrefillMeta

PREFILL_ROWS = 128       # tl.dot M rows of a 16-bit prefill tile (see `prefill_rows`)
TALL_PREFILL_ROWS = 256  # ... with 64 < hd <= 128
MAX_TILE_TOKENS = 128    # query tokens per prefill tile at most


@triton.jit
def _prefill_tile_step(q, m_i, l_i, acc, n0, q_pos, hi, table, k_base, v_base, qk_scale, offs_n,
                       offs_d, stride_kb, stride_kn, stride_vb, stride_vn, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr,
                       PRECISION: tl.constexpr):
    # one key tile n0 .. n0 + BLOCK_N - 1 of the online softmax; CAUSAL: the tile crosses some
    # row's limit q_pos (keys at or past hi are neither read nor counted)
    n = n0 + offs_n
    n_mask = n < hi
    k = _load_kv_tile(k_base, table, n, n_mask, offs_d, stride_kb, stride_kn, HEAD_DIM, BLOCK_D,
                      BLOCK_SIZE, CAUSAL)                                        # [BLOCK_N, BLOCK_D]
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale            # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        s = tl.where(n[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is in every row's first tile
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_kv_tile(v_base, table, n, n_mask, offs_d, stride_vb, stride_vn, HEAD_DIM, BLOCK_D,
                      BLOCK_SIZE, CAUSAL)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, tile_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr,
                    qk_scale, stride_qt, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb,
                    stride_vh, stride_vn, stride_bt, stride_ot, stride_oh,
                    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HPP: tl.constexpr,
                    NUM_HG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TILE_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1) // NUM_HG
    g0 = (tl.program_id(1) % NUM_HG) * HPP   # first head (within the group) of this program
    entry = tile_ptr + tile * 7                # tile map row: see prefill_meta.py
    t0 = tl.load(entry).to(tl.int64)
    n_q = tl.load(entry + 1)
    p0 = tl.load(entry + 2)
    row = tl.load(entry + 3).to(tl.int64)
    k0 = tl.load(entry + 4)                    # this program's keys: k0 .. k1 - 1 (a segment)
    k1 = tl.load(entry + 5)
    part = tl.load(entry + 6)                  # -1: write the output; else partial index
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tok = offs_m // HPP                                  # row r = (token r // HPP, head r % HPP)
    gh = g0 + offs_m % HPP
    m_valid = (tok < n_q) & (gh < GROUP)
    heads = kvh * GROUP + gh
    d_mask = offs_d < HEAD_DIM
    io_mask = m_valid[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + (t0 + tok)[:, None] * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=io_mask, other=0.0)                     # [BLOCK_M, BLOCK_D]
    q_pos = p0 + tl.minimum(tok, n_q - 1)  # dead rows borrow a live row's limit (never empty)
    hi = p0 + n_q                          # keys of the whole tile: 0 .. hi - 1
    table = bt_ptr + row * stride_bt
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys below full_end are visible to every row: no masks. k0 is a multiple of BLOCK_N and at
    # most p0, and k1 is hi or a multiple of BLOCK_N, so both loops stay inside the segment.
    full_end = (p0 + 1) // BLOCK_N * BLOCK_N
    for n0 in range(k0, tl.minimum(k1, full_end), BLOCK_N):
        m_i, l_i, acc = _prefill_tile_step(q, m_i, l_i, acc, n0, q_pos, hi, table, k_base, v_base,
                                           qk_scale, offs_n, offs_d, stride_kb, stride_kn,
                                           stride_vb, stride_vn, HEAD_DIM, BLOCK_D, BLOCK_SIZE,
                                           False, PRECISION)
    for n0 in range(tl.maximum(k0, full_end), k1, BLOCK_N):   # the diagonal: causal mask
        m_i, l_i, acc = _prefill_tile_step(q, m_i, l_i, acc, n0, q_pos, hi, table, k_base, v_base,
                                           qk_scale, offs_n, offs_d, stride_kb, stride_kn,
                                           stride_vb, stride_vn, HEAD_DIM, BLOCK_D, BLOCK_SIZE,
                                           True, PRECISION)
    if part < 0:
        o = acc / l_i[:, None]
        tl.store(out_ptr + (t0 + tok)[:, None] * stride_ot + heads[:, None] * stride_oh
                 + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:  # partials: po [parts, TILE_TOKENS, H, HEAD_DIM], pm / pl [parts, TILE_TOKENS, H]
        idx = (part * TILE_TOKENS + tok) * NUM_HEADS + heads                    # [BLOCK_M]
        tl.store(po_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=io_mask)
        tl.store(pm_ptr + idx, m_i, mask=m_valid)
        tl.store(pl_ptr + idx, l_i, mask=m_valid)


@triton.jit
def _prefill_merge_kernel(po_ptr, pm_ptr, pl_ptr, merge_ptr, out_ptr, stride_ot, stride_oh,
                          NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          TILE_TOKENS: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # grid (num_merges, H): merges the nseg segment partials of one split tile for one head
    h = tl.program_id(1)
    entry = merge_ptr + tl.program_id(0) * 7
    t0 = tl.load(entry).to(tl.int64)
    n_q = tl.load(entry + 1)
    part0 = tl.load(entry + 2)
    nseg = tl.load(entry + 3)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < n_q
    mask = t_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    m_run = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for j in range(0, nseg):  # every segment holds >= 1 key of every live row: m is finite
        idx = ((part0 + j).to(tl.int64) * TILE_TOKENS + offs_t) * NUM_HEADS + h  # [BLOCK_T]
        m = tl.load(pm_ptr + idx, mask=t_mask, other=0.0)
        m_new = tl.maximum(m_run, m)
        a = tl.exp2(m_run - m_new)
        w = tl.exp2(m - m_new)
        l_run = l_run * a + w * tl.load(pl_ptr + idx, mask=t_mask, other=0.0)
        o = tl.load(po_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        acc = acc * a[:, None] + w[:, None] * o
        m_run = m_new
    out = acc / l_run[:, None]
    tl.store(out_ptr + (t0 + offs_t)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def prefill_rows(dtype: torch.dtype, hd: int) -> int:
    """tl.dot M rows of a prefill tile. 16-bit: 256 for 64 < hd <= 128, where a tile twice as
    tall does twice the math per K/V tile loaded (H200, results/prefill_tiles-*-h200-2026-12-01.json:
    1.2-1.4x faster than 128 rows on long prompts for G = 4 and 7, 1.6-2.6x for G = 2, whose
    tiles had 64 rows; prompts of a few hundred keys within 0.97-1.03x; measured at hd 128 only,
    80 <= hd < 128 pad to the same 128-wide tile), 128 for hd <= 64 (256 rows measured 1.1-1.3x
    slower there), 64 for hd > 128; fp32 and hd % 16 != 0 (see `_wide`): 32."""
    if not _wide(dtype, hd):
        return 32
    return PREFILL_ROWS // 2 if hd > 128 else TALL_PREFILL_ROWS if hd > 64 else PREFILL_ROWS


def prefill_tile_tokens(dtype: torch.dtype, hd: int, group: int) -> int:
    """Query tokens per prefill tile (`PrefillMeta.build`'s tile_tokens) for a model layout:
    enough that a tile's tokens x min(G, 4) heads fill the tall rows (64 < hd <= 128; at most
    MAX_TILE_TOKENS tokens, so MHA gets 128 rows), else TILE_TOKENS. A power of two."""
    rows = prefill_rows(dtype, hd)
    if rows != TALL_PREFILL_ROWS:
        return TILE_TOKENS
    return min(MAX_TILE_TOKENS, rows // triton.next_power_of_2(min(group, 4)))


def prefill_config(dtype: torch.dtype, hd: int, group: int, tile_tokens: int,
                   rows: Optional[int] = None, block_n: Optional[int] = None,
                   num_warps: Optional[int] = None) -> dict:
    """Tile shape of one launch: HPP heads per program (NUM_HG programs per KV head), BLOCK_M rows
    (`prefill_rows`, or fewer when tile_tokens x G is less), BLOCK_N keys (64; 32 for hd > 128;
    16 without `_wide`), warps (16 for the tall 256 x 128 tiles, 8 from 4096 q elements per tile
    up, else 4; 2 for 16-bit scalar loads). compile_check holds them to no register spills, but
    for the tall tiles' 48-88 bytes: every spill-free tall config measured 1.2-1.3x slower.
    `rows`, `block_n` and `num_warps` override the choice (tuning sweeps)."""
    wide = _wide(dtype, hd)
    rows = rows or prefill_rows(dtype, hd)
    hpp = min(group, max(1, rows // tile_tokens))
    block_m = max(16, triton.next_power_of_2(tile_tokens * hpp))
    block_n = block_n or ((64 if hd <= 128 else 32) if wide else 16)
    block_d = max(16, triton.next_power_of_2(hd))
    warps = 16 if block_m * block_d >= TALL_PREFILL_ROWS * 128 else 8 if block_m * block_d >= 4096 else 4
    if not wide and dtype != torch.float32:
        warps = 2  # scalar loads (hd % 16 != 0): more registers per thread, or it spills
    return dict(HPP=hpp, NUM_HG=triton.cdiv(group, hpp), BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=num_warps or warps)


def merge_warps(tile_tokens: int, block_d: int) -> int:
    n = tile_tokens * block_d          # fp32 accumulator elements (16 warps: no spill at 128 x 128)
    return 16 if n >= 8192 else 8 if n >= 4096 else 4 if n >= 2048 else 1


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, meta: PrefillMeta, scale: float,
                            out: Optional[torch.Tensor] = None, num_stages: int = 2,
                            **tile_knobs) -> torch.Tensor:
    # q [T, H, hd] -> out [T, H, hd]. Per tile kind (prefill tiles, decode tiles) one attention
    # launch, plus one merge launch when some of its tiles were split into key segments.
    # `tile_knobs` (rows, block_n, num_warps) override prefill_config for the prefill tiles.
    t_total, h, hd = q.shape
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    assert t_total == meta.num_tokens, f"q has {t_total} rows, meta covers {meta.num_tokens}"
    assert meta.max_kv_len <= block_tables.shape[1] * bs, "block table narrower than kv_len"
    assert meta.packed.device == q.device
    if out is None:
        out = torch.empty((t_total, h, hd), dtype=q.dtype, device=q.device)
    group = h // kvh
    block_d = max(16, triton.next_power_of_2(hd))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    kinds = ((meta.prefill_tiles, meta.prefill_merges, meta.num_prefill_parts, meta.tile_tokens,
              meta.prefill_segment),
             (meta.decode_tiles, meta.decode_merges, meta.num_decode_parts, 1, meta.decode_segment))
    for tiles, merges, parts, tile_tokens, segment in kinds:
        if tiles.shape[0] == 0:
            continue
        cfg = prefill_config(q.dtype, hd, group, tile_tokens,
                             **(tile_knobs if tile_tokens > 1 else {}))
        warps = cfg.pop("num_warps")
        assert segment % cfg["BLOCK_N"] == 0, "key segments must be whole key tiles"
        if parts:
            assert parts * tile_tokens * h * hd < 2**31, "partial offsets are int32"
            po = _pa._empty((parts, tile_tokens, h, hd), torch.float32, q.device)
            pm = _pa._empty((parts, tile_tokens, h), torch.float32, q.device)
            pl = _pa._empty((parts, tile_tokens, h), torch.float32, q.device)
        else:  # fp32 dummy: same kernel signature
            po = pm = pl = _pa._empty((1,), torch.float32, q.device)
        launch(
            _prefill_kernel, (tiles.shape[0], kvh * cfg["NUM_HG"]),
            q, k_cache, v_cache, block_tables, tiles, out, po, pm, pl, scale * LOG2E, q.stride(0),
            q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1), NUM_HEADS=h, GROUP=group, HEAD_DIM=hd, BLOCK_SIZE=bs,
            TILE_TOKENS=tile_tokens, BLOCK_D=block_d, PRECISION=precision, num_warps=warps,
            num_stages=num_stages, **cfg)
        if merges.shape[0]:
            launch(
                _prefill_merge_kernel, (merges.shape[0], h),
                po, pm, pl, merges, out, out.stride(0), out.stride(1), NUM_HEADS=h, HEAD_DIM=hd,
                TILE_TOKENS=tile_tokens, BLOCK_T=max(2, tile_tokens), BLOCK_D=block_d,
                num_warps=merge_warps(tile_tokens, block_d))
    return out
