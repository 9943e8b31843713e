"""Content hashes of KV blocks: the one definition shared by the prefix cache and routing hints.

A prompt is cut into full blocks of `block_size` tokens. Block i's hash is chained on block i-1's:

    h_0 = H(ROOT, tokens[0:bs]),   h_i = H(h_{i-1}, tokens[i*bs:(i+1)*bs])

so equal hashes mean equal *prefixes*, not just equal blocks (H is 64-bit BLAKE2b; the prefix cache
also compares the tokens of a hit, so a collision can cost a cache miss, never a wrong answer). The
values are stable across processes, hosts and Python versions: the engine's prefix cache
(replica/blocks.py), the ingress that hashes prompts for the router, and the router that compares
the two all agree without sharing state. Only full blocks are hashed; a partial tail never is.

Pure Python (hashlib, array), no torch: the ingress imports it.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Iterator, Sequence

ROOT = 0
_MASK63 = (1 << 63) - 1   # keep hashes positive and JSON/msgpack-friendly


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """The hash of one full block whose prefix hashed to `parent` (ROOT for the first block)."""
    h = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little") & _MASK63


def iter_block_hashes(tokens: Sequence[int], block_size: int, parent: int = ROOT) -> Iterator[int]:
    """Chained hashes of every full block of `tokens`, first block first."""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start:start + block_size])
        yield parent


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    return list(iter_block_hashes(tokens, block_size))


SUMMARY_STRIDE = 8        # blocks: besides powers of two, every 8th depth (128 tokens at block 16)
HINT_STRIDE_DEPTHS = 48   # a hint carries the deepest 48 stride depths of a prompt (~6k tokens)


def is_summary_depth(depth: int) -> bool:
    """Depths (in blocks) whose block a replica publishes in its prefix summary: powers of two,
    for a coarse match at any length, and multiples of `SUMMARY_STRIDE`, so that a follow-up turn
    that resends a history finds it to within 128 tokens (with powers of two alone a 3k-token
    history matches at 2k: the router would see a third of the saving)."""
    return depth > 0 and (depth & (depth - 1) == 0 or depth % SUMMARY_STRIDE == 0)


def summary_depths(num_blocks: int) -> list[int]:
    """The depths a routing hint samples for a prompt of `num_blocks` full blocks: powers of two,
    the deepest `HINT_STRIDE_DEPTHS` multiples of `SUMMARY_STRIDE`, and `num_blocks` itself, in
    increasing order (at most ~12 + 48 + 1 per prompt; router/hint.py keeps 64). Published
    summaries hold the blocks at `is_summary_depth` depths, so every sampled depth but the last
    can match."""
    pow2, d = [], 1
    while d <= num_blocks:
        pow2.append(d)
        d *= 2
    top = num_blocks - num_blocks % SUMMARY_STRIDE
    stride = range(max(top - (HINT_STRIDE_DEPTHS - 1) * SUMMARY_STRIDE, SUMMARY_STRIDE), top + 1, SUMMARY_STRIDE)
    out = set(pow2) | set(stride)
    if num_blocks:
        out.add(num_blocks)
    return sorted(out)


def prefix_summary(tokens: Sequence[int], block_size: int) -> tuple[tuple[int, int], ...]:
    """((depth in blocks, hash of the prefix of that many blocks), ...) at `summary_depths`."""
    hashes = block_hashes(tokens, block_size)
    return tuple((d, hashes[d - 1]) for d in summary_depths(len(hashes)))
