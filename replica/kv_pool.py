"""The KV pool: one K and one V tensor per layer, allocated once, addressed by slot.

Layout per layer: [num_slots + 1, KVH, max_seq_len, hd]. A slot holds one sequence for its whole life;
the tensors never move or resize, so a CUDA graph captured against them stays valid. The extra last
slot is scratch: padding rows of a bucket write and read there, so they cannot disturb real sequences.
`SlotAllocator` hands out slot numbers; `leaked()` lets tests prove every slot came back.
"""
from __future__ import annotations

import torch


class KVPool:
    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_slots + 1, num_kv_heads, max_seq_len, head_dim)
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.scratch_slot = num_slots
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_slot(num_layers, num_kv_heads, max_seq_len, head_dim, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * max_seq_len * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def addresses(self) -> list[int]:
        return [t.data_ptr() for t in self.k + self.v]


class SlotAllocator:
    """Free-list of slot numbers 0..n-1. Not thread-safe: only the step thread calls it."""

    def __init__(self, num_slots: int):
        self.capacity = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._used: set[int] = set()

    def allocate(self) -> int:
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise RuntimeError(f"slot {slot} released twice or never allocated")
        self._used.remove(slot)
        self._free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def leaked(self) -> int:
        """Slots in use; 0 once every sequence has finished or been aborted."""
        return len(self._used)
