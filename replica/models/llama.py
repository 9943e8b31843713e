"""Llama-family decoder (Llama, Mistral, Qwen2 layouts) written for decode speed.

Weights are plain tensors with the projections fused: `wqkv` = [q; k; v] and `w13` = [gate; up],
so a layer runs 4 GEMMs and 5 fused kernels (replica/kernels). The model owns no cache: it reads and
writes the engine's KV pool (replica/kv_pool.py) through slot ids, so one set of static buffers serves
every batch bucket.

Two entry points:
- `decode(...)`: one token for each of B rows. Pure tensor code with no host sync and no
  data-dependent Python, so it can be captured in a CUDA graph.
- `prefill(...)`: a chunk of one sequence's prompt, eager; returns the last position's logits.
HF's modeling code is the reference the tests compare against (same weights, same tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from replica import kernels as K


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    tie_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelShape":
        heads = cfg.num_attention_heads
        return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, num_layers=cfg.num_hidden_layers,
                   num_heads=heads, num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                   rms_eps=cfg.rms_norm_eps, tie_embeddings=bool(cfg.tie_word_embeddings),
                   qkv_bias=cfg.model_type == "qwen2")

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        return (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                self.num_kv_heads * self.head_dim)


@dataclass
class LayerWeights:
    ln1: torch.Tensor            # [D]
    wqkv: torch.Tensor           # [(H + 2 KVH) hd, D]
    bqkv: Optional[torch.Tensor]  # [(H + 2 KVH) hd] (Qwen2) or None
    wo: torch.Tensor             # [D, H hd]
    ln2: torch.Tensor            # [D]
    w13: torch.Tensor            # [2 I, D]  gate rows first, then up
    w2: torch.Tensor             # [D, I]


def rope_tables(hf_config, max_seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_seq_len, hd/2] in fp32, from HF's own rotary embedding (so every rope_type HF
    supports, llama3 scaling included, matches), times its attention scaling."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = LlamaRotaryEmbedding(config=hf_config)
    inv_freq = rot.inv_freq.to(device=device, dtype=torch.float32)
    freqs = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    scale = float(rot.attention_scaling)
    return (freqs.cos() * scale).contiguous(), (freqs.sin() * scale).contiguous()


class LlamaModel:
    def __init__(self, shape: ModelShape, embed: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        self.shape = shape
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.cos, self.sin = cos, sin
        self.scale = shape.head_dim ** -0.5

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def weight_bytes(self) -> int:
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for L in self.layers:
            tensors += [t for t in (L.ln1, L.wqkv, L.bqkv, L.wo, L.ln2, L.w13, L.w2) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _layers(self, x, positions, slot_ids, kv, attend):
        """The decoder stack over N token rows. x [N, D]; returns the final normed hidden [N, D]."""
        s = self.shape
        residual = x
        h = K.rms_norm(x, self.layers[0].ln1, s.rms_eps)
        for i, L in enumerate(self.layers):
            if i > 0:
                h, residual = K.add_rms_norm(x, residual, L.ln1, s.rms_eps)
            qkv = F.linear(h, L.wqkv, L.bqkv)                                    # [N, (H+2KVH) hd]
            q = K.rope_store_kv(qkv, self.cos, self.sin, positions, slot_ids, kv.k[i], kv.v[i],
                                s.num_heads, s.num_kv_heads)                     # [N, H, hd]
            a = attend(q, kv.k[i], kv.v[i])                                      # [N, H, hd]
            x = F.linear(a.reshape(a.shape[0], -1), L.wo)                        # [N, D]
            h, residual = K.add_rms_norm(x, residual, L.ln2, s.rms_eps)
            x = F.linear(K.silu_mul(F.linear(h, L.w13)), L.w2)                   # [N, D]
        h, _ = K.add_rms_norm(x, residual, self.norm, s.rms_eps)
        return h

    def decode(self, tokens, positions, slot_ids, seq_lens, kv, logits_out) -> None:
        """One decode step for B rows; writes logits_out [B, V]. All inputs are [B] int64 device
        tensors; row b reads and writes KV slot slot_ids[b] at position positions[b] and attends to
        its first seq_lens[b] positions."""
        def attend(q, k_cache, v_cache):
            return K.decode_attention(q, k_cache, v_cache, slot_ids, seq_lens, self.scale)

        h = self._layers(self.embed[tokens], positions, slot_ids, kv, attend)
        torch.matmul(h, self.lm_head.t(), out=logits_out)

    def prefill(self, chunks: list[tuple[torch.Tensor, int, int]], kv) -> torch.Tensor:
        """Prefill prompt chunks of several sequences in ONE forward pass (eager: a forward costs
        ~15 ms of launches for an 8B model however few tokens it has, so chunks are packed).
        chunks: (tokens [n_i], start_i, slot_i); chunk i's tokens go to positions
        start_i..start_i+n_i-1 of KV slot slot_i. Returns the logits [len(chunks), V] of each
        chunk's last token."""
        dev = kv.k[0].device
        tokens = torch.cat([t for t, _, _ in chunks])
        positions = torch.cat([torch.arange(s, s + len(t), device=dev) for t, s, _ in chunks])
        slot_ids = torch.cat([torch.full((len(t),), slot, dtype=torch.long, device=dev) for t, _, slot in chunks])
        # Keys: each chunk's cache rows 0..end_i-1, packed. A token sees keys of its own chunk at
        # positions <= its own (block-diagonal causal mask with offsets).
        ends = [s + len(t) for t, s, _ in chunks]
        tok_chunk = torch.cat([torch.full((len(t),), i, device=dev) for i, (t, _, _) in enumerate(chunks)])
        key_chunk = torch.cat([torch.full((e,), i, device=dev) for i, e in enumerate(ends)])
        key_pos = torch.cat([torch.arange(e, device=dev) for e in ends])
        mask = (tok_chunk[:, None] == key_chunk[None, :]) & (key_pos[None, :] <= positions[:, None])

        def attend(q, k_cache, v_cache):
            k = torch.cat([k_cache[slot, :, :e] for (_, _, slot), e in zip(chunks, ends)], dim=1)  # [KVH, S, hd]
            v = torch.cat([v_cache[slot, :, :e] for (_, _, slot), e in zip(chunks, ends)], dim=1)
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                                 scale=self.scale, enable_gqa=True)   # [1, H, T, hd]
            return out[0].transpose(0, 1)                                              # [T, H, hd]

        h = self._layers(self.embed[tokens], positions, slot_ids, kv, attend)
        last = torch.tensor(ends, device=dev) - torch.tensor([s for _, s, _ in chunks], device=dev)
        last = last.cumsum(0) - 1                                                      # [C] rows
        return F.linear(h[last], self.lm_head)
