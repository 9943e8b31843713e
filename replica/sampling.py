"""Token selection inside the CUDA graph: greedy, temperature, top-k, top-p, per-row seeds.

No host sync and no data-dependent Python: every row goes through the same tensor ops, and the
per-row parameters are tensors. Randomness is a counter-based hash of (seed, step, token id), so a
request's tokens depend only on its own seed and its own output index - not on which batch row or
bucket it ran in, nor on what else was running. Sampling is an exponential race: argmax(p_i / E_i)
with E_i ~ Exp(1) picks i with probability p_i (the trick gpt-fast uses to avoid torch.multinomial's
sync), here with hashed instead of generator noise.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32). The multipliers are below
    2^31, so products stay below 2^63 and int64 never overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """U(0,1) noise [B, V] keyed by (seeds[b], steps[b], token_ids[b, j]); float32, never 0 or 1."""
    row = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ _mix32(steps & _M32)))  # [B]
    x = _mix32(_mix32(row[:, None] ^ ((token_ids * 0x27D4EB2F) & _M32)))                  # [B, V]
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; per-row temperature [B] f32 (0 = greedy), top_k [B] i64 (0 = off), top_p [B] f32
    (1 = off), seeds [B] i64, steps [B] i64 (the row's output index). Returns tokens [B] i64."""
    x = logits.float()
    V = x.shape[-1]
    scaled = x / temperature.clamp_min(1e-5)[:, None]
    sorted_logits, sorted_ids = torch.sort(scaled, dim=-1, descending=True)       # [B, V]
    probs = torch.softmax(sorted_logits, dim=-1)
    ranks = torch.arange(V, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    # Nucleus: keep a token while the mass before it is < top_p, so the top token always stays.
    keep = (ranks < k) & ((probs.cumsum(-1) - probs) < top_p[:, None])
    race = probs * keep / -torch.log(uniform_noise(seeds, steps, sorted_ids))      # p_i / Exp(1)
    sampled = sorted_ids.gather(1, race.argmax(-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, sampled, x.argmax(-1))
