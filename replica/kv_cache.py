"""The paged KV cache: one K and one V block pool per layer and the device block table. Allocated once.

Layout per layer: `[num_blocks, KVH, block_size, hd]`, so each block's tokens of one KV head are one
contiguous `[block_size, hd]` tile (coalesced loads in the attention kernels). Block 0 is scratch:
padding rows of a CUDA graph write and read there, so they can never touch a real sequence
(replica/blocks.py never hands it out).

`block_tables` is int32 `[rows + 1, max_blocks]`: row r lists the blocks of the sequence in table
row r (the scheduler's `Sequence.row`), in token order; the last row is scratch (all zeros: block 0)
for padding rows. Entries past a sequence's length are stale and never read. The tensors never
move or resize, so CUDA graphs captured against them stay valid; `addresses()` lets tests prove it.
"""
from __future__ import annotations

import torch

from replica.blocks import SCRATCH_BLOCK


class PagedKVCache:
    def __init__(self, num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, num_rows: int, max_seq_len: int, dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_blocks = -(-max_seq_len // block_size)
        self.block_tables = torch.full((num_rows + 1, self.max_blocks), SCRATCH_BLOCK,
                                       dtype=torch.int32, device=device)
        self.scratch_row = num_rows

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, block_size: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * block_size * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v) + \
            self.block_tables.numel() * self.block_tables.element_size()

    def write_table(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """block_tables[rows[i], positions[i] // bs] = slots[i] // bs for every fed token (a graph-safe
        scatter: idempotent for tokens whose block is already listed)."""
        bs = self.block_size
        self.block_tables[rows, positions // bs] = (slots // bs).to(torch.int32)

    def addresses(self) -> list[int]:
        return [t.data_ptr() for t in self.k + self.v] + [self.block_tables.data_ptr()]
