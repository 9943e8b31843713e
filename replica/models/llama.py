"""Llama-family decoder (Llama, Mistral, Qwen2 layouts) written for decode speed.

Weights are plain tensors with the projections fused: `wqkv` = [q; k; v] and `w13` = [gate; up],
so a layer runs 4 GEMMs and 5 fused kernels (replica/kernels). The model owns no cache: it reads and
writes the engine's paged KV cache (replica/kv_cache.py) through KV slots and block tables, so one
set of static buffers serves every batch bucket.

Two entry points over the same layers, differing only in attention:
- `decode(...)`: one token for each of B rows (split-K paged decode attention). Pure tensor code
  with no host sync and no data-dependent Python, so it is captured in a CUDA graph per bucket.
- `forward_mixed(...)`: an eager forward over packed chunks of several sequences (prompt chunks and
  decode rows in one weight read; varlen causal paged attention).
HF's modeling code is the reference the tests compare against (same weights, same tokens).
"""
from __future__ import annotations

import contextlib
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
    qk_norm: bool = False        # Qwen3: an RMSNorm over each query and key head before RoPE

    @property
    def matmul_params(self) -> int:
        """Weights one token multiplies through: every layer's four projections and the lm_head
        (not the embedding lookup). A token's matmuls cost 2x this in FLOPs."""
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        layer = self.hidden_size * (qkv + self.num_heads * self.head_dim + 3 * self.intermediate_size)
        return self.num_layers * layer + self.vocab_size * self.hidden_size

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelShape":
        heads = cfg.num_attention_heads
        return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, num_layers=cfg.num_hidden_layers,
                   num_heads=heads, num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                   rms_eps=cfg.rms_norm_eps, tie_embeddings=bool(cfg.tie_word_embeddings),
                   qkv_bias=cfg.model_type == "qwen2", qk_norm=cfg.model_type == "qwen3")


@dataclass
class LayerWeights:
    ln1: torch.Tensor            # [D]
    wqkv: torch.Tensor           # [(H + 2 KVH) hd, D]
    bqkv: Optional[torch.Tensor]  # [(H + 2 KVH) hd] (Qwen2) or None
    wo: torch.Tensor             # [D, H hd]
    ln2: torch.Tensor            # [D]
    w13: torch.Tensor            # [2 I, D]  gate rows first, then up
    w2: torch.Tensor             # [D, I]
    q_norm: Optional[torch.Tensor] = None   # [hd] (Qwen3) or None
    k_norm: Optional[torch.Tensor] = None   # [hd] (Qwen3) or None


def rope_tables(hf_config, max_seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_seq_len, hd/2] in fp32. Plain RoPE (a random preset's namespace config) is
    computed here; every other config goes through HF's own rotary embedding, so every rope_type
    HF supports (llama3 scaling included) matches, times its attention scaling."""
    if not hasattr(hf_config, "to_dict"):           # replica.presets namespace: default RoPE
        hd = hf_config.head_dim or hf_config.hidden_size // hf_config.num_attention_heads
        inv_freq = 1.0 / (hf_config.rope_theta ** (torch.arange(0, hd, 2, device=device,
                                                                dtype=torch.float32) / hd))
        scale = 1.0
    else:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rot = LlamaRotaryEmbedding(config=hf_config)
        inv_freq = rot.inv_freq.to(device=device, dtype=torch.float32)
        scale = float(rot.attention_scaling)
    freqs = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
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

    @contextlib.contextmanager
    def first_layers(self, n: int):
        """Run only the first n layers inside the block (start-up only: the stack is restored on
        exit). Every layer has the same kernels at the same shapes, so a forward over a few layers
        compiles what the whole stack launches (warm-up) and reaches the whole stack's activation
        peak (sizing), at a fraction of the launches and FLOPs."""
        full = self.layers
        self.layers = full[:max(1, n)]
        try:
            yield self
        finally:
            self.layers = full

    def weight_bytes(self) -> int:
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for L in self.layers:
            tensors += [t for t in (L.ln1, L.wqkv, L.bqkv, L.wo, L.ln2, L.w13, L.w2, L.q_norm, L.k_norm)
                        if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _layers(self, x, positions, slots, kv, attend):
        """The decoder stack over N token rows. x [N, D]; token n is at `positions[n]` and writes its
        K/V to KV slot `slots[n]` (block * block_size + offset). Returns the final normed hidden [N, D].
        The same pieces, split at each attention, are what `replica.mixed_graphs` captures."""
        residual = x
        q = self.qkv(0, K.rms_norm(x, self.layers[0].ln1, self.shape.rms_eps), positions, slots, kv)
        for i in range(len(self.layers)):
            a = attend(q, kv.k[i], kv.v[i])                                      # [N, H, hd]
            if i + 1 < len(self.layers):
                q = self.between(i, a, residual, positions, slots, kv)
        return self.last(a, residual)

    def qkv(self, i, h, positions, slots, kv, q_out=None):
        """Layer i from its normed input h [N, D] to attention: q [N, H, hd] (into q_out if given);
        K/V of every row stored at its slot."""
        L, s = self.layers[i], self.shape
        qkv = F.linear(h, L.wqkv, L.bqkv)                                        # [N, (H+2KVH) hd]
        if L.q_norm is not None:
            K.qk_rms_norm_(qkv, L.q_norm, L.k_norm, s.num_heads, s.num_kv_heads, s.rms_eps)
        return K.rope_store_kv_paged(qkv, self.cos, self.sin, positions, slots, kv.k[i], kv.v[i],
                                     s.num_heads, s.num_kv_heads, out=q_out)

    def _post(self, i, a, residual):
        """Layer i after attention: o-proj, norm, MLP. Returns the MLP output [N, D]; `residual`
        [N, D] is updated in place."""
        L, eps = self.layers[i], self.shape.rms_eps
        x = F.linear(a.reshape(a.shape[0], -1), L.wo)                            # [N, D]
        h, _ = K.add_rms_norm(x, residual, L.ln2, eps)
        return F.linear(K.silu_mul(F.linear(h, L.w13)), L.w2)                    # [N, D]

    def between(self, i, a, residual, positions, slots, kv, q_out=None):
        """From layer i's attention output a [N, H, hd] to layer i + 1's q (and its K/V stored)."""
        x = self._post(i, a, residual)
        h, _ = K.add_rms_norm(x, residual, self.layers[i + 1].ln1, self.shape.rms_eps)
        return self.qkv(i + 1, h, positions, slots, kv, q_out)

    def last(self, a, residual):
        """From the last layer's attention output to the final normed hidden [N, D]."""
        x = self._post(len(self.layers) - 1, a, residual)
        h, _ = K.add_rms_norm(x, residual, self.norm, self.shape.rms_eps)
        return h

    def decode(self, tokens, positions, slots, table_rows, kv, logits_out) -> None:
        """One decode step for B rows; writes logits_out [B, V]. All inputs are [B] int64 device
        tensors: row b feeds tokens[b] at positions[b] (KV slot slots[b]) and attends to positions
        0..positions[b] of the sequence in block-table row table_rows[b]. Graph-capturable."""
        seq_lens = positions + 1

        def attend(q, k_cache, v_cache):
            return K.paged_decode_attention(q, k_cache, v_cache, kv.block_tables, table_rows, seq_lens,
                                            self.scale)

        h = self._layers(self.embed[tokens], positions, slots, kv, attend)
        torch.matmul(h, self.lm_head.t(), out=logits_out)

    def forward_mixed(self, tokens, positions, slots, meta, kv, logit_rows) -> torch.Tensor:
        """One eager forward over packed chunks (prefill chunks and 1-token decode rows alike):
        `meta` (kernels.PrefillMeta) says where each chunk starts and how much KV it sees; token n
        attends causally within its chunk and to its sequence's earlier KV. One weight read serves
        every chunk. Returns the logits [len(logit_rows), V] of the rows `logit_rows` (int64).
        Rows past `meta.num_tokens` are padding (token 0 at position 0, K/V to slot 0 in the
        scratch block): every matmul runs them, attention skips them (their output is zero), and
        no real row reads them."""
        n = meta.num_tokens
        padded = None
        if tokens.shape[0] > n:
            s = self.shape
            padded = torch.zeros(tokens.shape[0], s.num_heads, s.head_dim, dtype=self.dtype, device=self.device)

        def attend(q, k_cache, v_cache):
            if padded is None:
                return K.paged_prefill_attention(q, k_cache, v_cache, kv.block_tables, meta, self.scale)
            # one buffer for every layer: layer i's o-proj reads it before layer i + 1 writes it
            K.paged_prefill_attention(q[:n], k_cache, v_cache, kv.block_tables, meta, self.scale, out=padded[:n])
            return padded

        h = self._layers(self.embed[tokens], positions, slots, kv, attend)
        return F.linear(h[logit_rows], self.lm_head)
