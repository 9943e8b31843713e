"""BlockPool: allocation, reference counts, the prefix cache (chained hashes, token check on hit)
and LRU eviction; block hashes are stable and chained."""
from __future__ import annotations

import random

import pytest

from replica.block_hash import (HINT_STRIDE_DEPTHS, ROOT, SUMMARY_STRIDE, block_hash, block_hashes,
                                is_summary_depth, prefix_summary, summary_depths)
from replica.blocks import SCRATCH_BLOCK, BlockPool, OutOfBlocksError


def _fill(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate blocks for `tokens` and register the full ones, as the scheduler does."""
    bs = pool.block_size
    blocks = pool.allocate(-(-len(tokens) // bs))
    h = ROOT
    for i in range(len(tokens) // bs):
        h = pool.register(blocks[i], h, tokens[i * bs:(i + 1) * bs], i + 1)
    return blocks


def test_hashes_are_chained_and_stable():
    a = list(range(40))
    b = [7] * 8 + a[8:]
    ha, hb = block_hashes(a, 8), block_hashes(b, 8)
    assert len(ha) == 5 and ha[0] != hb[0]
    assert all(x != y for x, y in zip(ha, hb))        # one different block changes every later hash
    assert ha[1] == block_hash(ha[0], a[8:16])
    assert block_hash(ROOT, [1, 2, 3]) == 7734876972953562849   # stable across processes and versions
    assert summary_depths(5) == [1, 2, 4, 5] and summary_depths(8) == [1, 2, 4, 8]
    assert prefix_summary(a, 8) == ((1, ha[0]), (2, ha[1]), (4, ha[3]), (5, ha[4]))


def test_summary_depths_sample_powers_of_two_and_the_deepest_stride_multiples():
    assert summary_depths(30) == [1, 2, 4, 8, 16, 24, 30]
    deep = summary_depths(1000)
    stride = [d for d in deep if d % SUMMARY_STRIDE == 0 and d & (d - 1)]
    assert len(stride) <= HINT_STRIDE_DEPTHS and stride[-1] == 1000 and stride[0] == 1000 - 47 * SUMMARY_STRIDE
    assert deep[-1] == 1000 and deep == sorted(set(deep)) and len(deep) <= 63
    assert len(summary_depths(8192)) <= 63                            # 128k tokens at block 16: fits a hint
    # every sampled depth but the prompt's own length is one a replica publishes
    assert all(is_summary_depth(d) for d in summary_depths(203)[:-1])
    assert not is_summary_depth(203) and is_summary_depth(64) and is_summary_depth(200)


def test_allocate_release_and_scratch_never_handed_out():
    pool = BlockPool(9, 4)
    got = pool.allocate(8)
    assert SCRATCH_BLOCK not in got and sorted(got) == list(range(1, 9))
    with pytest.raises(OutOfBlocksError):
        pool.allocate(1)
    pool.release(got)
    assert pool.num_free == 8 and pool.leaked() == 0
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([got[0]])
    pool.check()


def test_prefix_hits_share_blocks_and_stop_at_the_first_miss():
    pool = BlockPool(32, 4)
    prompt = list(range(100, 114))                       # 3 full blocks + 2 tokens
    first = _fill(pool, prompt)
    hits, hashes = pool.match(prompt[:8] + [0, 0, 0, 0] + prompt[12:], 14)
    assert hits == first[:2] and hashes == block_hashes(prompt, 4)[:2]
    pool.acquire(hits)                                   # shared: ref 2
    pool.release(first)
    assert pool.leaked() == 2                            # still held by the second sequence
    pool.release(hits)
    assert pool.leaked() == 0 and pool.num_cached == 3
    # max_tokens caps the match: a prompt that is all cached still recomputes its last block
    hits, _ = pool.match(prompt[:12], 11)
    assert hits == first[:2]
    pool.check()


def test_collisions_are_misses_not_wrong_answers():
    pool = BlockPool(8, 2)
    blocks = _fill(pool, [1, 2, 3, 4])
    pool._tokens[blocks[0]] = (9, 9)                     # simulate a hash collision: same hash, other tokens
    assert pool.match([1, 2, 3, 4], 4) == ([], [])


def test_lru_eviction_takes_free_blocks_first_then_oldest_cached():
    pool = BlockPool(7, 2)                               # 6 usable blocks
    a = _fill(pool, [1, 1, 2, 2])
    b = _fill(pool, [3, 3, 4, 4])
    pool.release(a)
    pool.release(b)                                      # both cached, a older (released first)
    fresh = pool.allocate(2)
    assert not set(fresh) & set(a + b)                   # never-cached blocks go first
    pool.allocate(2)                                     # now the LRU cached ones: a's
    assert pool.match([1, 1, 2, 2], 4) == ([], [])
    assert pool.match([3, 3, 4, 4], 4)[0] == b
    assert pool.counters.evicted_blocks == 2
    pool.check()


def test_random_churn_keeps_the_invariants():
    rng = random.Random(0)
    pool = BlockPool(64, 4)
    held = []
    for _ in range(3000):
        if held and (rng.random() < 0.5 or pool.num_free < 8):
            pool.release(held.pop(rng.randrange(len(held))))
            continue
        tokens = [rng.randrange(3) for _ in range(rng.randint(1, 20))]
        hits, _ = pool.match(tokens, len(tokens) - 1)
        need = -(-len(tokens) // 4) - len(hits)
        if need + sum(pool._ref[b] == 0 for b in hits) > pool.num_free:
            continue
        pool.acquire(hits)
        blocks = hits + pool.allocate(need)
        h = ROOT
        for i in range(len(tokens) // 4):
            h = pool.register(blocks[i], h, tokens[4 * i:4 * i + 4], i + 1)
        held.append(blocks)
        pool.check()
    for blocks in held:
        pool.release(blocks)
    pool.check()
    assert pool.leaked() == 0 and pool.counters.evicted_blocks > 0
    assert all(isinstance(h, int) for h in pool.summary(100))


def test_summary_publishes_every_stride_depth_so_a_resent_history_matches_nearly_whole():
    bs = 4
    pool = BlockPool(64, bs)
    history = list(range(1000, 1000 + 30 * bs + 3))          # 30 full blocks + a partial one
    _fill(pool, history)
    follow_up = history + [7] * (3 * bs)                      # the next turn resends it and adds more
    held = set(pool.summary(1000))
    matched = max(d for d, h in prefix_summary(follow_up, bs) if h in held)
    assert matched == 24 == 30 - 30 % SUMMARY_STRIDE          # powers of two alone: 16
