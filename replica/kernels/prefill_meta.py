"""Per-step metadata of `paged_prefill_attention`: chunk lengths on the host, a tile map on the device.

Contract: `PrefillMeta.build(q_lens, kv_lens, table_rows, device)` is called once per packed step on
the host, before the layer loop, and the same object is passed to every layer's attention call.
Chunk c has q_lens[c] >= 1 query tokens (rows of q, chunks back to back in list order), reads table
row table_rows[c], and its tokens sit at positions kv_lens[c] - q_lens[c] .. kv_lens[c] - 1 (so
kv_lens[c] >= q_lens[c]; kv_lens[c] - q_lens[c] is the cached prefix). Building costs one
host-to-device copy of one packed int32 tensor (from pinned memory on CUDA, so it does not wait for
the stream); nothing is read back. Torch and numpy only (no triton): the reference path uses it too.

Tiles. Chunks with q_len >= 2 are cut into prefill tiles of `tile_tokens` query tokens (the
caller's choice: `paged_prefill.prefill_tile_tokens` for its layout; 32 by default); the kernel
stacks them with up to 4 of the G query heads of one KV head into its tl.dot M dimension, so the
map does not depend on G. Chunks with q_len == 1 (decode rows mixed into the
step) become decode tiles of one token (the kernel stacks all G heads). Each kind has its own
kernel launch and its own section of the map.

Key segments (split-K). A tile attends keys 0 .. p0 + n - 1. Long tiles are split into segments
of `segment` keys, per kind: segment = max(MIN_SEGMENT, next_pow2(sum of the kind's key counts /
TARGET_TILES)), so a kind has at least ~TARGET_TILES tile programs (x KVH x head groups) when its
keys allow it. Segments cut only below p0 + 1 (every row of the tile sees at least one key of
every segment); the last one runs to p0 + n. A split tile's segments write fp32 partials, which a
merge pass combines; unsplit tiles write the output directly. H200, llama-8b bf16
(benchmarks/kernels_bench.py --sweep): a 128-token chunk over a 32k cached prefix is 4 tiles, 32
programs unsplit: 1007 us; 2048-key segments 291 us, 4096-key 274 us. One 2048-token chunk over
a 30k prefix (64 tiles, 512 programs): 3755 us unsplit, 3322 us with 4096-key segments (finer
waves, less tail). Short prompts and decode rows (keys < MIN_SEGMENT) are never split.

Rows of `tiles` (int32 [num_tiles, 7], one per Triton program along grid axis 0):
    (t0, n, p0, row, k0, k1, part) = (first q row in T, valid query tokens (<= tile tokens),
        position of the first token, block-table row, first key, end key, partial index or -1)
    a program's token i (< n) attends keys k0 .. min(k1, p0 + i + 1) - 1.
Rows of `merges` (int32 [num_merges, 7], first 4 used): (t0, n, part0, nseg): the partials
part0 .. part0 + nseg - 1 of the tile starting at q row t0.
Order: longest chunk (kv_len) first and, within a chunk, heaviest tile (largest p0) first, so long
programs start first (less tail) and the tiles of one chunk run side by side (they stream the
same K/V, which then hits L2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

TILE_TOKENS = 32     # query tokens per prefill tile (power of two)
TARGET_TILES = 512   # split keys into segments until a kind has about this many tile programs
MIN_SEGMENT = 4096   # keys per segment at least (a power of two, a multiple of every BLOCK_N)
COLS = 7
# Each section of `packed` starts on a multiple of 4 rows (4 x 7 int32 = 112 B, a multiple of 16):
# Triton specializes pointer arguments on 16-byte alignment, so a section at an odd offset would
# need a second compiled variant of its kernel, compiled mid-run the first time the prefill tile
# count is not a multiple of 4 (a cold JIT stall inside a loaded step).
ALIGN_ROWS = 4


def _aligned(n: int) -> int:
    return -(-n // ALIGN_ROWS) * ALIGN_ROWS


def _pad(section: list) -> list:
    """`section` followed by zero rows up to a multiple of ALIGN_ROWS (never read: every launch's
    grid is its section's true length)."""
    return section + [(0,) * COLS] * (_aligned(len(section)) - len(section))


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _segment_tiles(entries: list, segment: Optional[int]):
    """entries: (t0, n, p0, row) of one kind, in launch order -> (tiles, merges, parts, segment)."""
    if segment is None:
        work = sum(p0 + n for _, n, p0, _ in entries)
        segment = max(MIN_SEGMENT, _next_pow2(-(-work // TARGET_TILES)))
    tiles, merges, parts = [], [], 0
    for t0, n, p0, row in entries:
        nseg = -(-(p0 + 1) // segment)  # cuts below p0 + 1 only: no row sees an empty segment
        if nseg == 1:
            tiles.append((t0, n, p0, row, 0, p0 + n, -1))
            continue
        for j in range(nseg):
            tiles.append((t0, n, p0, row, j * segment,
                          p0 + n if j == nseg - 1 else (j + 1) * segment, parts + j))
        merges.append((t0, n, parts, nseg, 0, 0, 0))
        parts += nseg
    return tiles, merges, parts, segment


@dataclass(frozen=True)
class PrefillMeta:
    q_lens: tuple[int, ...]       # [C] query tokens per chunk
    kv_lens: tuple[int, ...]      # [C] positions attended by the chunk's last token, + 1
    table_rows: tuple[int, ...]   # [C] block-table row per chunk
    num_tokens: int               # T = sum(q_lens)
    max_kv_len: int               # max(kv_lens): the block table must cover it
    tile_tokens: int              # query tokens per prefill tile
    num_prefill_tiles: int        # programs (segments) of prefill tiles
    num_decode_tiles: int         # programs (segments) of decode tiles
    num_prefill_merges: int       # split prefill tiles (merge programs)
    num_decode_merges: int
    num_prefill_parts: int        # partials written by prefill-tile segments
    num_decode_parts: int
    prefill_segment: int          # keys per segment of each kind
    decode_segment: int
    packed: torch.Tensor          # int32 [sections, 7] on `device`, each section ALIGN_ROWS-aligned: one H2D copy

    @property
    def prefill_tiles(self) -> torch.Tensor:   # int32 [num_prefill_tiles, 7], 16-byte aligned
        return self.packed[: self.num_prefill_tiles]

    @property
    def decode_tiles(self) -> torch.Tensor:
        start = _aligned(self.num_prefill_tiles)
        return self.packed[start: start + self.num_decode_tiles]

    @property
    def prefill_merges(self) -> torch.Tensor:
        start = _aligned(self.num_prefill_tiles) + _aligned(self.num_decode_tiles)
        return self.packed[start: start + self.num_prefill_merges]

    @property
    def decode_merges(self) -> torch.Tensor:
        start = (_aligned(self.num_prefill_tiles) + _aligned(self.num_decode_tiles)
                 + _aligned(self.num_prefill_merges))
        return self.packed[start: start + self.num_decode_merges]

    @classmethod
    def build(cls, q_lens: Sequence[int], kv_lens: Sequence[int], table_rows: Sequence[int],
              device, *, tile_tokens: int = TILE_TOKENS,
              segment: Optional[int] = None) -> "PrefillMeta":
        """`tile_tokens` / `segment` (keys per segment, a power of two >= 64; default: per kind,
        see the module docstring) are tuning and test knobs."""
        q_lens, kv_lens, table_rows = (tuple(int(x) for x in v) for v in (q_lens, kv_lens, table_rows))
        if not (len(q_lens) == len(kv_lens) == len(table_rows) > 0):
            raise ValueError("q_lens, kv_lens and table_rows need one entry per chunk (>= 1 chunk)")
        if tile_tokens < 1 or tile_tokens & (tile_tokens - 1):
            raise ValueError(f"tile_tokens must be a power of two, got {tile_tokens}")
        if segment is not None and (segment < 64 or segment & (segment - 1)):
            raise ValueError(f"segment must be a power of two >= 64, got {segment}")
        for c, (ql, kl, row) in enumerate(zip(q_lens, kv_lens, table_rows)):
            if not (1 <= ql <= kl < 2**31 and 0 <= row < 2**31):
                raise ValueError(f"chunk {c}: need 1 <= q_len <= kv_len and row >= 0, "
                                 f"got q_len={ql} kv_len={kl} row={row}")
        q_start = np.concatenate(([0], np.cumsum(q_lens)[:-1])).tolist()
        order = sorted(range(len(q_lens)), key=lambda c: -kv_lens[c])  # stable: ties keep order
        prefill, decode = [], []
        for c in order:
            ql, kl, row, t0 = q_lens[c], kv_lens[c], table_rows[c], q_start[c]
            if ql == 1:
                decode.append((t0, 1, kl - 1, row))
                continue
            for off in reversed(range(0, ql, tile_tokens)):  # heaviest (last) tile first
                prefill.append((t0 + off, min(tile_tokens, ql - off), kl - ql + off, row))
        p_tiles, p_merges, p_parts, p_seg = _segment_tiles(prefill, segment)
        d_tiles, d_merges, d_parts, d_seg = _segment_tiles(decode, segment)
        rows = [r for section in (p_tiles, d_tiles, p_merges) for r in _pad(section)] + d_merges
        packed = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), COLS)
        device = torch.device(device)
        if device.type == "cuda":  # pinned source: the copy is async (no wait on the stream)
            packed = packed.pin_memory().to(device, non_blocking=True)
        else:
            packed = packed.to(device)
        return cls(q_lens=q_lens, kv_lens=kv_lens, table_rows=table_rows,
                   num_tokens=int(sum(q_lens)), max_kv_len=max(kv_lens), tile_tokens=tile_tokens,
                   num_prefill_tiles=len(p_tiles), num_decode_tiles=len(d_tiles),
                   num_prefill_merges=len(p_merges), num_decode_merges=len(d_merges),
                   num_prefill_parts=p_parts, num_decode_parts=d_parts, prefill_segment=p_seg,
                   decode_segment=d_seg, packed=packed)
