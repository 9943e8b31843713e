"""TEMPORARY torch references of the paged ops, until the kernels branch lands (then deleted)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from replica.kernels.reference import _rotate


@dataclass
class PrefillMeta:
    q_lens: list[int]
    kv_lens: list[int]
    table_rows: list[int]

    @classmethod
    def build(cls, q_lens, kv_lens, table_rows, device):
        return cls(list(q_lens), list(kv_lens), list(table_rows))


def rope_store_kv_paged(qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, num_heads, num_kv_heads):
    n = qkv.shape[0]
    bs, hd = k_cache.shape[2], k_cache.shape[-1]
    h, kvh = num_heads, num_kv_heads
    q = qkv[:, : h * hd].view(n, h, hd).float()
    k = qkv[:, h * hd: (h + kvh) * hd].view(n, kvh, hd).float()
    v = qkv[:, (h + kvh) * hd: (h + 2 * kvh) * hd].view(n, kvh, hd)
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    blk, off = slot_mapping // bs, slot_mapping % bs
    k_cache[blk, :, off] = _rotate(k, c, s).to(k_cache.dtype)
    v_cache[blk, :, off] = v.to(v_cache.dtype)
    return _rotate(q, c, s).to(qkv.dtype)


def _attend_one(q, k_cache, v_cache, blocks, kv_len, q_pos, scale):
    # q [n, H, hd]; blocks [nb] long; keys 0..kv_len-1; query i sees keys <= q_pos[i]
    bs = k_cache.shape[2]
    kvh = k_cache.shape[1]
    k = k_cache[blocks].permute(1, 0, 2, 3).reshape(kvh, -1, k_cache.shape[-1])[:, :kv_len].float()
    v = v_cache[blocks].permute(1, 0, 2, 3).reshape(kvh, -1, v_cache.shape[-1])[:, :kv_len].float()
    h = q.shape[1]
    g = h // kvh
    k = k.repeat_interleave(g, 0)
    v = v.repeat_interleave(g, 0)
    s = torch.einsum("nhd,hkd->hnk", q.float(), k) * scale
    mask = torch.arange(kv_len)[None, :] <= q_pos[:, None]
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hnk,hkd->nhd", torch.softmax(s, -1), v).to(q.dtype)


def paged_decode_attention(q, k_cache, v_cache, block_tables, table_rows, seq_lens, scale):
    bs = k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        L = int(seq_lens[b])
        blocks = block_tables[int(table_rows[b]), : -(-L // bs)].long()
        out[b:b + 1] = _attend_one(q[b:b + 1], k_cache, v_cache, blocks, L, torch.tensor([L - 1]), scale)
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, meta, scale):
    bs = k_cache.shape[2]
    out = torch.empty_like(q)
    start = 0
    for ql, kl, row in zip(meta.q_lens, meta.kv_lens, meta.table_rows):
        blocks = block_tables[row, : -(-kl // bs)].long()
        pos = torch.arange(kl - ql, kl)
        out[start:start + ql] = _attend_one(q[start:start + ql], k_cache, v_cache, blocks, kl, pos, scale)
        start += ql
    return out
