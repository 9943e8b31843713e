"""Per-step metadata of `paged_prefill_attention`: chunk lengths on the host, a tile map on the device.

Contract: `PrefillMeta.build(q_lens, kv_lens, table_rows, device)` is called once per packed step on
the host, before the layer loop, and the same object is passed to every layer's attention call.
Chunk c has q_lens[c] >= 1 query tokens (rows of q, chunks back to back in list order), reads table
row table_rows[c], and its tokens sit at positions kv_lens[c] - q_lens[c] .. kv_lens[c] - 1 (so
kv_lens[c] >= q_lens[c]; kv_lens[c] - q_lens[c] is the cached prefix). Building costs one
host-to-device copy of one packed int32 tensor (from pinned memory on CUDA, so it does not wait for
the stream); nothing is read back. Torch only (no triton): the reference path uses it too.

The tile map (`tiles`, int32 [num_tiles, 4]) has one entry per Triton program along grid axis 0:
    (t0, n, p0, row) = (first q row in T, valid query tokens <= tile tokens, position of the
                        first token, block-table row)
so a program attends keys 0 .. p0 + n - 1 and its token i (< n) sees keys 0 .. p0 + i.
Two kinds of tile, each launched with its own kernel specialization:
- prefill tiles: chunks with q_len >= 2 are cut into tiles of `tile_tokens` (default 32) query
  tokens; the kernel stacks them with (up to 4 of) the G query heads of one KV head into a
  128-row tl.dot M dimension, so the map does not depend on G. Entries [0, num_prefill_tiles).
- decode tiles: chunks with q_len == 1 (decode rows mixed into the step), one token each; the
  kernel stacks all G heads of one token (M = max(16, G)). Entries [num_prefill_tiles, num_tiles).
Within each kind, tiles are ordered longest chunk (kv_len) first and, within a chunk, heaviest
tile (largest p0) first, so the long programs start first (less tail) and the tiles of one chunk
run side by side (they stream the same K/V, which then hits L2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

TILE_TOKENS = 32  # query tokens per prefill tile (power of two)


@dataclass(frozen=True)
class PrefillMeta:
    q_lens: tuple[int, ...]       # [C] query tokens per chunk
    kv_lens: tuple[int, ...]      # [C] positions attended by the chunk's last token, + 1
    table_rows: tuple[int, ...]   # [C] block-table row per chunk
    num_tokens: int               # T = sum(q_lens)
    max_kv_len: int               # max(kv_lens): the block table must cover it
    tile_tokens: int              # query tokens per prefill tile
    num_prefill_tiles: int
    num_decode_tiles: int
    tiles: torch.Tensor           # int32 [num_prefill_tiles + num_decode_tiles, 4] on `device`

    @property
    def prefill_tiles(self) -> torch.Tensor:
        return self.tiles[: self.num_prefill_tiles]

    @property
    def decode_tiles(self) -> torch.Tensor:
        return self.tiles[self.num_prefill_tiles:]

    @classmethod
    def build(cls, q_lens: Sequence[int], kv_lens: Sequence[int], table_rows: Sequence[int],
              device, *, tile_tokens: int = TILE_TOKENS) -> "PrefillMeta":
        q_lens, kv_lens, table_rows = (tuple(int(x) for x in v) for v in (q_lens, kv_lens, table_rows))
        if not (len(q_lens) == len(kv_lens) == len(table_rows) > 0):
            raise ValueError("q_lens, kv_lens and table_rows need one entry per chunk (>= 1 chunk)")
        if tile_tokens < 1 or tile_tokens & (tile_tokens - 1):
            raise ValueError(f"tile_tokens must be a power of two, got {tile_tokens}")
        for c, (ql, kl, row) in enumerate(zip(q_lens, kv_lens, table_rows)):
            if not (1 <= ql <= kl < 2**31 and 0 <= row < 2**31):
                raise ValueError(f"chunk {c}: need 1 <= q_len <= kv_len and row >= 0, "
                                 f"got q_len={ql} kv_len={kl} row={row}")
        q_start = np.concatenate(([0], np.cumsum(q_lens)[:-1])).astype(np.int64)
        order = sorted(range(len(q_lens)), key=lambda c: -kv_lens[c])  # stable: ties keep order
        prefill, decode = [], []
        for c in order:
            ql, kl, row, t0 = q_lens[c], kv_lens[c], table_rows[c], int(q_start[c])
            if ql == 1:
                decode.append((t0, 1, kl - 1, row))
                continue
            offs = np.arange(0, ql, tile_tokens)[::-1]  # heaviest (last) tile first
            n = np.minimum(tile_tokens, ql - offs)
            prefill.append(np.stack([t0 + offs, n, kl - ql + offs, np.full_like(offs, row)], 1))
        rows = prefill + ([np.asarray(decode, dtype=np.int64)] if decode else [])
        packed = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)
        tiles = torch.from_numpy(np.ascontiguousarray(packed))
        device = torch.device(device)
        if device.type == "cuda":  # pinned source: the copy is async (no wait on the stream)
            tiles = tiles.pin_memory().to(device, non_blocking=True)
        else:
            tiles = tiles.to(device)
        num_prefill = sum(len(p) for p in prefill)
        return cls(q_lens=q_lens, kv_lens=kv_lens, table_rows=table_rows,
                   num_tokens=int(sum(q_lens)), max_kv_len=max(kv_lens), tile_tokens=tile_tokens,
                   num_prefill_tiles=num_prefill, num_decode_tiles=len(decode), tiles=tiles)
