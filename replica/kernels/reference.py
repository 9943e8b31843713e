"""Pure-torch reference implementations of the decode hot-path ops.

Contract (shared with the Triton kernels in `fused.py`, `paged_attention.py` and `paged_prefill.py`,
dispatched by `replica.kernels`):
- Same signatures, shapes and dtypes as the public ops; outputs have the input's dtype, all math
  (norm statistics, rotations, softmax, silu) runs in fp32 and is rounded once at the end.
- `add_rms_norm` writes the sum into `residual` in place and returns it as `new_residual`
  (both backends do, so engine code that aliases buffers behaves the same on CPU and GPU).
- The paged attention references gather each sequence's blocks through the block table; the CPU
  path of the engine and the test oracle, not a fast path.
- Attention never lets cache rows at or beyond a sequence's length influence the result, even if
  they hold NaN/inf (an uninitialised `torch.empty` KV pool).
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


def qk_rms_norm_(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int,
                 num_kv_heads: int, eps: float) -> torch.Tensor:
    # In place: each query head of qkv [N, (H + 2*KVH) * hd] normed with q_weight [hd], each key
    # head with k_weight [hd] (Qwen3's q_norm / k_norm, before RoPE); values untouched. Returns qkv.
    n, hd = qkv.shape[0], q_weight.shape[0]
    heads = num_heads + num_kv_heads
    qk = qkv[:, :heads * hd].view(n, heads, hd)
    w = torch.cat([q_weight.expand(num_heads, hd), k_weight.expand(num_kv_heads, hd)]).float()
    xf = qk.float()
    qk.copy_(xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * w)
    return qkv


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


# ---------------------------------------------------------------------------------------------
# Paged KV cache: k/v_cache [num_blocks, KVH, BS, hd]; token p of table row r lives at
# cache[block_tables[r, p // BS], :, p % BS]. Table entries past a sequence's last block are
# garbage (any int): the references replace them by block 0 before indexing, so a stale or
# out-of-range id is never dereferenced.
def rope_store_kv_paged(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        positions: torch.Tensor, slot_mapping: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                        num_kv_heads: int) -> torch.Tensor:
    # qkv [N, (H + 2*KVH) * hd]; positions [N] int64 (RoPE); slot_mapping [N] int64 flat token
    # addresses: token n goes to cache[slot // BS, :, slot % BS]. Returns rotated q [N, H, hd].
    n = qkv.shape[0]
    hd, bs = k_cache.shape[-1], k_cache.shape[2]
    h, kvh = num_heads, num_kv_heads
    q = qkv[:, : h * hd].view(n, h, hd).float()
    k = qkv[:, h * hd: (h + kvh) * hd].view(n, kvh, hd).float()
    v = qkv[:, (h + kvh) * hd: (h + 2 * kvh) * hd].view(n, kvh, hd)
    c = cos[positions].unsqueeze(1)  # [N, 1, hd/2]
    s = sin[positions].unsqueeze(1)
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    k_cache[blocks, :, offsets] = _rotate(k, c, s).to(k_cache.dtype)  # indexed view [N, KVH, hd]
    v_cache[blocks, :, offsets] = v.to(v_cache.dtype)
    return _rotate(q, c, s).to(qkv.dtype)


def _gather_paged(cache: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    # cache [NB, KVH, BS, hd]; table [B, nb] block ids; lens [B] -> [B, KVH, nb * BS, hd] fp32,
    # positions at or past lens[b] zeroed (stale or NaN contents cannot leak in through 0 * NaN).
    b, nb = table.shape
    _, kvh, bs, hd = cache.shape
    used = torch.arange(nb, device=table.device)[None, :] * bs < lens[:, None]        # [B, nb]
    blocks = torch.where(used, table, torch.zeros_like(table)).long()                # garbage -> 0
    x = cache[blocks].float().permute(0, 2, 1, 3, 4).reshape(b, kvh, nb * bs, hd)
    valid = torch.arange(nb * bs, device=table.device)[None, :] < lens[:, None]        # [B, nb*BS]
    return torch.where(valid[:, None, :, None], x, 0.0)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, table_rows: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    # q [B, H, hd]; caches [NB, KVH, BS, hd]; block_tables [R, max_blocks]; table_rows/seq_lens
    # [B] -> out [B, H, hd] in q.dtype. Row b attends positions 0..seq_lens[b]-1 of table row
    # table_rows[b]. On CUDA it gathers all max_blocks blocks (O(max_len), capturable); on CPU it
    # reads max(seq_lens) on the host and gathers only the blocks that can be used.
    b, h, hd = q.shape
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    table = block_tables[table_rows]                                               # [B, max_blocks]
    if not q.is_cuda:
        table = table[:, : -(-int(seq_lens.max()) // bs)]
    k = _gather_paged(k_cache, table, seq_lens)                                    # [B, KVH, L, hd]
    v = _gather_paged(v_cache, table, seq_lens)
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None]  # [B, L]
    qg = q.float().view(b, kvh, h // kvh, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale                         # [B, KVH, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)                           # [B, KVH, G, hd]
    return out.reshape(b, h, hd).to(q.dtype)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, meta, scale: float) -> torch.Tensor:
    # q [T, H, hd]: meta.q_lens[c] tokens of chunk c back to back; chunk c uses table row
    # meta.table_rows[c], holds positions kv_lens[c]-q_lens[c] .. kv_lens[c]-1, and its token i
    # attends positions 0 .. kv_lens[c]-q_lens[c]+i. Loops over chunks with the host lengths of
    # `meta` (a PrefillMeta); no device reads. out [T, H, hd] in q.dtype.
    t_total, h, hd = q.shape
    kvh, bs = k_cache.shape[1], k_cache.shape[2]
    group = h // kvh
    out = torch.empty_like(q)
    start = 0
    for q_len, kv_len, row in zip(meta.q_lens, meta.kv_lens, meta.table_rows):
        nb = -(-kv_len // bs)
        blocks = block_tables[row, :nb].long()                                     # [nb]
        k = k_cache[blocks].float().permute(1, 0, 2, 3).reshape(kvh, nb * bs, hd)[:, :kv_len]
        v = v_cache[blocks].float().permute(1, 0, 2, 3).reshape(kvh, nb * bs, hd)[:, :kv_len]
        qc = q[start: start + q_len].float().view(q_len, kvh, group, hd).permute(1, 2, 0, 3)
        scores = torch.matmul(qc, k[:, None].transpose(-1, -2)) * scale            # [KVH, G, q, kv]
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        causal = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]  # [q, kv]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        o = torch.matmul(probs, v[:, None])                                        # [KVH, G, q, hd]
        out[start: start + q_len] = o.permute(2, 0, 1, 3).reshape(q_len, h, hd).to(q.dtype)
        start += q_len
    assert start == t_total, f"meta covers {start} query tokens, q has {t_total}"
    return out
