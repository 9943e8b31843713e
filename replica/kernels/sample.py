"""Triton kernels of the sampler (replica/sampling.py): penalties, the draw, top log-probabilities.

The torch sampler sorts every row of [B, V] fp32 logits and hashes noise for all B x V entries in
int64; at 512 rows of a 128k vocabulary that took 18 ms a step on an H200, against 0.08 ms for
the greedy argmax (results/sampling-torch-h200-2026-12-02.json). These kernels do the same
arithmetic per row without a sort, touching each entry a few times:

- `apply_penalties_(x, rows, ...)`: repetition, presence and frequency penalties in place on the
  processed fp32 logits x [B, V]; a row that uses none returns at once (grid B x V-tiles).
- `draw(x, rows, steps, ...)`: pass 1 in SPLIT-wide slices of every row (B x V / SPLIT programs):
  argmax x (greedy rows stop there), the max m and normaliser Z of s = x / T, and the exponential
  race's winner c = argmax s_i - ln(-ln u_i), with u the same counter-based noise as
  `replica.sampling.uniform_noise` (bit for bit); plain temperature rows stop there. Then one
  program per row: with min_p, the race again over s_i >= m + ln(min_p). Top-k / top-p keep the tokens with s >= tau,
  where tau is the larger of the k-th largest s and the nucleus edge; the race's winner over that
  set is found by rejection without knowing tau: c is kept when fewer than k tokens lie above it
  and their mass is below top_p, else the next candidate is the race's winner among the tokens
  above c (by the race's memorylessness, the winner over any set is the argmax over that set).
  Each round is one pass and removes at least every token at or below s_c, so it ends; a
  rejected candidate's mass-above is typically a uniform fraction of the rest's, so rounds are few
  (one when the first candidate is in the nucleus).
- `top_logprobs(raw, rows, tokens, ...)`: for rows that ask for logprobs (a table column >= 0),
  the chosen token's log-probability under the raw logits and the top MAX_LOGPROBS, in two
  kernels (top-k per chunk of the vocabulary, then a merge with the chunks' log-sum-exp).

Table columns are read by position, in replica.sampling's order: floats F_TEMP, F_TOP_P,
F_MIN_P, F_PRESENCE, F_FREQUENCY, F_REPETITION (0..5); ints I_TOP_K, I_SEED, I_MIN_TOKENS,
I_LOGPROBS (0..3).

Ties differ from the sort only where two logits are exactly equal at a cut. Every kernel reads
the sampling tables through `rows`, is CUDA-graph capturable (shape-only launch parameters) and
launches through `launch.launch`, so start-up's compile-ahead pass compiles it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from replica.kernels.launch import launch

BLOCK = 1024          # vocabulary entries per loop step of a program
SPLIT = 8192          # vocabulary entries per program of the draw's first pass (a multiple of BLOCK)
LP_CHUNK = 4096       # vocabulary entries per program of the top-logprobs first stage
LP_K = 32             # candidates kept per chunk (>= MAX_LOGPROBS, a power of two)
MAX_ROUNDS = 64       # rejection rounds at most; each removes every token at or below the candidate
NEG = tl.constexpr(-3.0e38)   # a finite "minus infinity" for running maxima (exp(NEG - m) == 0)


@triton.jit
def _mix32(x):
    """replica.sampling._mix32 on uint32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x5BD1E995
    return x ^ (x >> 16)


@triton.jit
def _race_keys(s, ids, row_key):
    """s_i - ln(-ln u_i): the race's key (argmax p_i / E_i, E_i = -ln u_i ~ Exp(1))."""
    t = ids.to(tl.uint32) * 0x27D4EB2F
    h = _mix32(_mix32(row_key ^ t))
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return s - tl.log(-tl.log(u))


@triton.jit
def _penalties_kernel(x_ptr, x_stride, rows_ptr, floats_ptr, counts_ptr, seen_ptr, table_stride, V,
                      BLOCK: tl.constexpr):
    b, tile = tl.program_id(0), tl.program_id(1)
    r = tl.load(rows_ptr + b)
    presence = tl.load(floats_ptr + r * 6 + 3)
    frequency = tl.load(floats_ptr + r * 6 + 4)
    rep = tl.load(floats_ptr + r * 6 + 5)
    if (presence != 0.0) | (frequency != 0.0) | (rep != 1.0):
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        ok = offs < V
        x = tl.load(x_ptr + b * x_stride + offs, mask=ok, other=0.0)
        counts = tl.load(counts_ptr + r * table_stride + offs, mask=ok, other=0)
        seen = (tl.load(seen_ptr + r * table_stride + offs, mask=ok, other=0) != 0) | (counts > 0)
        x = tl.where(seen, tl.where(x > 0, x / rep, x * rep), x)
        x = x - presence * (counts > 0).to(tl.float32) - frequency * counts.to(tl.float32)
        tl.store(x_ptr + b * x_stride + offs, x, mask=ok)


@triton.jit
def _draw_split_kernel(x_ptr, x_stride, rows_ptr, steps_ptr, floats_ptr, ints_ptr, ints_stride, part_f_ptr,
                       part_i_ptr, V, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 over one SPLIT-wide slice of a row: argmax x, the max and normaliser of s = x / T,
    and the race's winner over every token of the slice. Partials [B, splits, 4] fp32 (max x,
    max s, sum exp(s - max s), best key) and [B, splits, 2] int32 (argmax x, race winner)."""
    b, sp = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(1)
    r = tl.load(rows_ptr + b)
    inv_t = 1.0 / tl.maximum(tl.load(floats_ptr + r * 6 + 0), 1e-5)
    row_key = _row_key(tl.load(ints_ptr + r * ints_stride + 1), tl.load(steps_ptr + b))
    row = x_ptr + b * x_stride
    lanes = tl.arange(0, BLOCK)
    # lane-wise accumulators, reduced once after the loop (no barrier per tile)
    acc_x, at_x = tl.full([BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK], tl.int32)
    acc_m, acc_z = tl.full([BLOCK], NEG, tl.float32), tl.zeros([BLOCK], tl.float32)
    acc_k, at_k = tl.full([BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK], tl.int32)
    for start in range(sp * SPLIT, sp * SPLIT + SPLIT, BLOCK):
        ids = start + lanes
        x = tl.load(row + ids, mask=ids < V, other=float("-inf"))
        acc_x, at_x = _lane_max(acc_x, at_x, x, ids)
        s = x * inv_t
        m_new = tl.maximum(acc_m, s)
        acc_z = acc_z * tl.exp(acc_m - m_new) + tl.exp(s - m_new)
        acc_m = m_new
        acc_k, at_k = _lane_max(acc_k, at_k, tl.where(ids < V, _race_keys(s, ids, row_key), float("-inf")), ids)
    best_x, best_i = _first_max(acc_x, at_x)
    m = tl.max(acc_m, axis=0)
    z = tl.sum(acc_z * tl.exp(acc_m - m), axis=0)
    best_key, best_r = _first_max(acc_k, at_k)
    out = b * n_splits + sp
    tl.store(part_f_ptr + out * 4 + 0, best_x)
    tl.store(part_f_ptr + out * 4 + 1, m)
    tl.store(part_f_ptr + out * 4 + 2, z)
    tl.store(part_f_ptr + out * 4 + 3, best_key)
    tl.store(part_i_ptr + out * 2 + 0, best_i)
    tl.store(part_i_ptr + out * 2 + 1, best_r)


@triton.jit
def _draw_kernel(x_ptr, x_stride, rows_ptr, steps_ptr, floats_ptr, ints_ptr, ints_stride, part_f_ptr, part_i_ptr,
                 out_ptr, V, n_splits, SPLITS_P2: tl.constexpr, BLOCK: tl.constexpr, MAX_ROUNDS: tl.constexpr):
    """One program per row: the partials combined (greedy rows and plain temperature rows end
    here), then min_p's race and the top-k / top-p rejection rounds over the whole row."""
    b = tl.program_id(0)
    r = tl.load(rows_ptr + b)
    temp = tl.load(floats_ptr + r * 6 + 0)
    top_p = tl.load(floats_ptr + r * 6 + 1)
    min_p = tl.load(floats_ptr + r * 6 + 2)
    top_k = tl.load(ints_ptr + r * ints_stride + 0)
    inv_t = 1.0 / tl.maximum(temp, 1e-5)
    sp = tl.arange(0, SPLITS_P2)
    here = sp < n_splits
    part = (b * n_splits + sp)
    px = tl.load(part_f_ptr + part * 4 + 0, mask=here, other=float("-inf"))
    pm = tl.load(part_f_ptr + part * 4 + 1, mask=here, other=float("-inf"))
    pz = tl.load(part_f_ptr + part * 4 + 2, mask=here, other=0.0)
    pk = tl.load(part_f_ptr + part * 4 + 3, mask=here, other=float("-inf"))
    token = tl.load(part_i_ptr + (b * n_splits + tl.argmax(px, axis=0)) * 2 + 0)    # argmax x
    if temp > 0:
        m = tl.max(pm, axis=0)
        z = tl.sum(pz * tl.exp(pm - m), axis=0)
        cand = tl.load(part_i_ptr + (b * n_splits + tl.argmax(pk, axis=0)) * 2 + 1)  # the race's winner
        row = x_ptr + b * x_stride
        lanes = tl.arange(0, BLOCK)
        row_key = _row_key(tl.load(ints_ptr + r * ints_stride + 1), tl.load(steps_ptr + b))
        if min_p > 0:                                          # p_i >= min_p * p_max
            cand = _race_winner(row, V, inv_t, row_key, m + tl.log(min_p), lanes, BLOCK)
        truncate = ((top_k > 0) & (top_k < V)) | (top_p < 1.0)
        k_cap = tl.where(top_k > 0, top_k, V + 1)
        rounds = 0
        go = truncate
        while go:
            s_c = tl.load(row + cand) * inv_t
            # tokens above the candidate: their count, mass and race winner, in one pass
            above, mass = tl.zeros([BLOCK], tl.int32), tl.zeros([BLOCK], tl.float32)
            acc_k, at_k = tl.full([BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK], tl.int32)
            for start in range(0, V, BLOCK):
                ids = start + lanes
                s = tl.load(row + ids, mask=ids < V, other=float("-inf")) * inv_t
                up = s > s_c
                above += up.to(tl.int32)
                mass += tl.where(up, tl.exp(s - m), 0.0)
                acc_k, at_k = _lane_max(acc_k, at_k, tl.where(up, _race_keys(s, ids, row_key), float("-inf")), ids)
            nxt = _first_max(acc_k, at_k)[1]
            above, mass = tl.sum(above, axis=0), tl.sum(mass, axis=0)
            rounds += 1
            go = ((above >= k_cap) | (mass >= top_p * z)) & (rounds < MAX_ROUNDS)
            if go:
                cand = nxt
        token = cand
    tl.store(out_ptr + b, token.to(tl.int64))


@triton.jit
def _row_key(seed, step):
    """A row's part of replica.sampling.uniform_noise's hash, from int64 seed and step."""
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ _mix32(hi ^ _mix32((step & 0xFFFFFFFF).to(tl.uint32))))


@triton.jit
def _race_winner(row, V, inv_t, row_key, floor, lanes, BLOCK: tl.constexpr):
    """argmax over s_i >= floor of the race key (first index on ties)."""
    acc_k, at_k = tl.full([BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        ids = start + lanes
        s = tl.load(row + ids, mask=ids < V, other=float("-inf")) * inv_t
        acc_k, at_k = _lane_max(acc_k, at_k, tl.where(s >= floor, _race_keys(s, ids, row_key), float("-inf")), ids)
    return _first_max(acc_k, at_k)[1]


@triton.jit
def _lane_max(acc, at, v, ids):
    """Per lane: the larger of acc and v, and where it was (the earlier index on ties)."""
    up = v > acc
    return tl.where(up, v, acc), tl.where(up, ids, at)


@triton.jit
def _first_max(acc, at):
    """The max over lanes and its first index (the smallest index holding the max)."""
    best = tl.max(acc, axis=0)
    return best, tl.min(tl.where(acc == best, at, 0x7FFFFFFF), axis=0)


@triton.jit
def _lp_chunk_kernel(raw_ptr, raw_stride, rows_ptr, ints_ptr, ints_stride, vals_ptr, ids_ptr, stat_ptr, V,
                     CHUNK: tl.constexpr, K: tl.constexpr):
    """Per (row, chunk) of rows that want logprobs: the chunk's top K raw logits (values, ids,
    largest first) and its max and sum of exp(x - max)."""
    b, c = tl.program_id(0), tl.program_id(1)
    n_chunks = tl.num_programs(1)
    r = tl.load(rows_ptr + b)
    if tl.load(ints_ptr + r * ints_stride + 3) >= 0:
        ids = c * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(raw_ptr + b * raw_stride + ids, mask=ids < V, other=float("-inf")).to(tl.float32)
        cmax = tl.max(x, axis=0)
        tl.store(stat_ptr + (b * n_chunks + c) * 2, cmax)
        tl.store(stat_ptr + (b * n_chunks + c) * 2 + 1, tl.sum(tl.exp(x - cmax), axis=0))
        out = (b * n_chunks + c) * K
        for j in range(K):
            v = tl.max(x, axis=0)
            i = tl.argmax(x, axis=0)
            tl.store(vals_ptr + out + j, v)
            tl.store(ids_ptr + out + j, c * CHUNK + i)
            x = tl.where(tl.arange(0, CHUNK) == i, float("-inf"), x)


@triton.jit
def _lp_merge_kernel(raw_ptr, raw_stride, rows_ptr, ints_ptr, ints_stride, tokens_ptr, vals_ptr, ids_ptr,
                     stat_ptr, lp_ptr, top_vals_ptr, top_ids_ptr, n_chunks, TOP: tl.constexpr,
                     CANDS: tl.constexpr, CHUNKS_P2: tl.constexpr):
    b = tl.program_id(0)
    r = tl.load(rows_ptr + b)
    if tl.load(ints_ptr + r * ints_stride + 3) >= 0:
        c = tl.arange(0, CHUNKS_P2)
        cm = tl.load(stat_ptr + (b * n_chunks + c) * 2, mask=c < n_chunks, other=float("-inf"))
        cz = tl.load(stat_ptr + (b * n_chunks + c) * 2 + 1, mask=c < n_chunks, other=0.0)
        m = tl.max(cm, axis=0)
        log_z = m + tl.log(tl.sum(cz * tl.exp(cm - m), axis=0))
        tok = tl.load(tokens_ptr + b)
        tl.store(lp_ptr + b, tl.load(raw_ptr + b * raw_stride + tok).to(tl.float32) - log_z)
        k = tl.arange(0, CANDS)
        total = n_chunks * (CANDS // CHUNKS_P2)
        vals = tl.load(vals_ptr + b * total + k, mask=k < total, other=float("-inf"))
        for j in range(TOP):
            v = tl.max(vals, axis=0)
            i = tl.argmax(vals, axis=0)
            tl.store(top_vals_ptr + b * TOP + j, v - log_z)
            tl.store(top_ids_ptr + b * TOP + j, tl.load(ids_ptr + b * total + i).to(tl.int64))
            vals = tl.where(k == i, float("-inf"), vals)


def apply_penalties_(x: torch.Tensor, rows: torch.Tensor, floats: torch.Tensor, counts: torch.Tensor,
                     prompt_seen: torch.Tensor) -> None:
    """x [B, V] fp32 in place; rows [B] index the tables (floats [R, 6], counts [R, V] int32,
    prompt_seen [R, V] bool)."""
    B, V = x.shape
    launch(_penalties_kernel, (B, triton.cdiv(V, BLOCK)), x, x.stride(0), rows, floats, counts, prompt_seen,
           counts.stride(0), V, BLOCK=BLOCK)


def draw(x: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor,
         out: torch.Tensor) -> None:
    """Tokens of x [B, V] fp32 (processed logits) into out [B] int64; rows, steps [B] int64."""
    B, V = x.shape
    n_splits = triton.cdiv(V, SPLIT)
    part_f = torch.empty(B, n_splits, 4, dtype=torch.float32, device=x.device)
    part_i = torch.empty(B, n_splits, 2, dtype=torch.int32, device=x.device)
    tables = (rows, steps, floats, ints, ints.stride(0), part_f, part_i)
    launch(_draw_split_kernel, (B, n_splits), x, x.stride(0), *tables, V, SPLIT=SPLIT, BLOCK=BLOCK)
    launch(_draw_kernel, (B,), x, x.stride(0), *tables, out, V, n_splits,
           SPLITS_P2=triton.next_power_of_2(n_splits), BLOCK=BLOCK, MAX_ROUNDS=MAX_ROUNDS)


def top_logprobs(raw: torch.Tensor, rows: torch.Tensor, ints: torch.Tensor, tokens: torch.Tensor,
                 logprob: torch.Tensor, top_vals: torch.Tensor, top_ids: torch.Tensor) -> None:
    """For the rows whose table asks for logprobs (ints[r, 3] >= 0): logprob [B] of `tokens` and the
    top_vals / top_ids [B, TOP] under log_softmax(raw); raw [B, V] in any float dtype. Other rows'
    outputs are left as they were."""
    B, V = raw.shape
    n_chunks = triton.cdiv(V, LP_CHUNK)
    vals = torch.empty(B, n_chunks * LP_K, dtype=torch.float32, device=raw.device)
    ids = torch.empty(B, n_chunks * LP_K, dtype=torch.int32, device=raw.device)
    stat = torch.empty(B, n_chunks, 2, dtype=torch.float32, device=raw.device)
    head = (raw, raw.stride(0), rows, ints, ints.stride(0))
    launch(_lp_chunk_kernel, (B, n_chunks), *head, vals, ids, stat, V, CHUNK=LP_CHUNK, K=LP_K)
    chunks_p2 = triton.next_power_of_2(n_chunks)
    launch(_lp_merge_kernel, (B,), *head, tokens, vals, ids, stat, logprob, top_vals, top_ids, n_chunks,
           TOP=top_vals.shape[1], CANDS=chunks_p2 * LP_K, CHUNKS_P2=chunks_p2)
