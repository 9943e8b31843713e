"""KV block accounting: the free list, reference counts and the prefix cache. Pure Python.

The pool has `num_blocks` blocks of `block_size` tokens; block 0 is the scratch block that padding
rows of a CUDA graph write into, so it is never handed out. The model runner owns the tensors; this
module only decides which block ids a sequence holds.

Prefix cache: when a block is full and its KV written, the scheduler `register`s it under its
chained content hash (replica/block_hash.py). A new prompt `match`es its leading full blocks
against those hashes (and their tokens, so a hash collision is a miss) and `acquire`s the hits
instead of prefilling them. Blocks are shared by reference count. A registered block whose count
drops to 0 stays cached but evictable, in LRU order; `allocate` takes never-registered free blocks
first, then evicts the least recently used cached ones. An unregistered block returns straight to
the free list.

Invariants (checked by `check()` in tests): every block other than 0 is exactly one of in use
(ref > 0), free, or evictable; a hash maps to at most one block and back.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

from replica.block_hash import ROOT, block_hash, is_summary_depth

SCRATCH_BLOCK = 0


class OutOfBlocksError(RuntimeError):
    """allocate() asked for more blocks than are free or evictable (a scheduler bug)."""


@dataclass
class PrefixCacheCounters:
    queried_tokens: int = 0     # prompt tokens looked up at admission
    hit_tokens: int = 0         # of those, served from cached blocks
    evicted_blocks: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._ref = [0] * num_blocks
        self._hash: list[Optional[int]] = [None] * num_blocks
        self._tokens: dict[int, tuple[int, ...]] = {}        # registered block -> its tokens
        self._summarised: dict[int, None] = {}                 # registered blocks at summary depths
        self._by_hash: dict[int, int] = {}
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))   # pop() hands out low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()     # LRU first
        self.counters = PrefixCacheCounters()

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out now (free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def in_use(self) -> int:
        return self.usable_blocks - self.num_free

    # -- prefix cache ---------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """Leading full blocks of `tokens` (within the first `max_tokens`) found in the cache:
        (block ids, their hashes). Does not take references: `acquire` the ids to keep them."""
        blocks, hashes = [], []
        if not self.enable_prefix_cache:
            return blocks, hashes
        bs, parent = self.block_size, ROOT
        for start in range(0, max_tokens - bs + 1, bs):
            chunk = tuple(tokens[start:start + bs])
            h = block_hash(parent, chunk)
            b = self._by_hash.get(h)
            if b is None or self._tokens.get(b) != chunk:
                break
            blocks.append(b)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks (hits of `match`)."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1

    def register(self, block: int, parent_hash: int, tokens: Sequence[int], depth: int) -> int:
        """Record a full, written block under its chained hash; returns the hash (the parent of the
        next block). If the same content is already cached in another block, this one stays
        unregistered (it is freed normally when released)."""
        h = block_hash(parent_hash, tokens)
        if self.enable_prefix_cache and h not in self._by_hash and self._hash[block] is None:
            self._by_hash[h] = block
            self._hash[block] = h
            self._tokens[block] = tuple(tokens)
            if is_summary_depth(depth):
                self._summarised[block] = None
        return h

    def note_lookup(self, queried: int, hit: int) -> None:
        self.counters.queried_tokens += queried
        self.counters.hit_tokens += hit

    # -- allocation -----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocksError(f"asked for {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._unregister(b)
                self.counters.evicted_blocks += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block (a sequence finished, aborted or was preempted).
        Release a sequence's blocks last-first, so its deepest blocks become LRU victims first."""
        for b in reversed(blocks):
            if self._ref[b] <= 0:
                raise RuntimeError(f"block {b} released more often than taken")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def _unregister(self, b: int) -> None:
        h = self._hash[b]
        if h is not None:
            del self._by_hash[h]
            self._hash[b] = None
            self._tokens.pop(b, None)
            self._summarised.pop(b, None)

    # -- reporting ------------------------------------------------------------------------------
    def summary(self, limit: int) -> tuple[int, ...]:
        """Hashes of cached prefixes at summary depths (block_hash.is_summary_depth): blocks in use
        first, then idle (evictable) ones, newest registered first; at most `limit`. O(blocks at
        those depths), not O(pool): it runs in the GPU loop's process."""
        newest = list(reversed(self._summarised))
        in_use = [self._hash[b] for b in newest if self._ref[b] > 0]
        idle = [self._hash[b] for b in newest if self._ref[b] == 0]
        return tuple((in_use + idle)[:limit])

    def leaked(self) -> int:
        """Blocks held by someone; 0 once every sequence has finished or been aborted."""
        return self.in_use()

    def check(self) -> None:
        """Assert the pool's invariants (tests)."""
        free, evict = set(self._free), set(self._evictable)
        assert not free & evict and SCRATCH_BLOCK not in free | evict
        for b in range(1, self.num_blocks):
            held = self._ref[b] > 0
            assert held + (b in free) + (b in evict) == 1, f"block {b}: ref {self._ref[b]}"
            if b in evict:
                assert self._hash[b] is not None
        for h, b in self._by_hash.items():
            assert self._hash[b] == h
