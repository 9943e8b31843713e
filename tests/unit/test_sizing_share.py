"""`memory_utilization` is a share of the card per engine (replica/sizing.py step 3): the KV budget
is that share less what the engine itself holds, never more than is free, so two engines at 0.45
fit on one GPU whichever starts first. Plain arithmetic on constructed byte counts (no CUDA)."""
from __future__ import annotations

import pytest

from replica import EngineConfig
from replica.config import ConfigError
from replica.sizing import plan_cuda, share_left

GiB = 1 << 30
TOTAL = 140 * GiB
WEIGHTS = 16 * GiB
BPB = 2 << 20                       # llama-8b: 16 tokens x 128 KiB
RESERVE = lambda act: int(act * 1.2) + (64 << 20)  # noqa: E731  (plan_cuda's reserve rule)


def _cfg(util: float) -> EngineConfig:
    return EngineConfig(model="random:llama-8b", memory_utilization=util, max_seq_len=8192)


def _pool_bytes(util: float, free_at_init: int, activation: int = 2 * GiB) -> int:
    """The KV pool one engine allocates, starting on a card with `free_at_init` bytes free."""
    free = free_at_init - WEIGHTS
    plan = plan_cuda(_cfg(util), TOTAL, free, free_at_init - free, activation, BPB, 256)
    return (plan.num_blocks - 1) * BPB


def test_two_engines_at_045_get_the_same_pool_whichever_starts_first():
    first = _pool_bytes(0.45, TOTAL)
    held_by_first = WEIGHTS + first + RESERVE(2 * GiB)
    second = _pool_bytes(0.45, TOTAL - held_by_first)
    assert first == pytest.approx(0.45 * TOTAL - WEIGHTS - RESERVE(2 * GiB), abs=BPB)
    assert second == pytest.approx(first, abs=BPB)
    assert held_by_first + WEIGHTS + second + RESERVE(2 * GiB) <= 0.9 * TOTAL + BPB


def test_memory_held_by_others_does_not_shrink_the_share():
    """A neighbour holding 30 GiB leaves the same 0.5 share: only free memory can cap it."""
    alone = _pool_bytes(0.5, TOTAL)
    beside = _pool_bytes(0.5, TOTAL - 30 * GiB)
    assert beside == alone


def test_free_memory_caps_the_share():
    """A card with 40 GiB free cannot give a 0.9 share: the pool takes what is free, less the reserve."""
    free_at_init = 40 * GiB
    got = _pool_bytes(0.9, free_at_init)
    assert got == pytest.approx(free_at_init - WEIGHTS - RESERVE(2 * GiB), abs=BPB)
    assert share_left(_cfg(0.9), TOTAL, free=24 * GiB, own=WEIGHTS) == 24 * GiB


def test_a_share_smaller_than_the_weights_fails_with_a_clear_error():
    with pytest.raises(ConfigError, match="KV budget holds"):
        _pool_bytes(0.1, TOTAL)


def test_an_explicit_kv_cache_bytes_ignores_the_share():
    c = EngineConfig(model="random:llama-8b", memory_utilization=0.1, kv_cache_bytes=8 * GiB, max_seq_len=8192)
    plan = plan_cuda(c, TOTAL, TOTAL - WEIGHTS, WEIGHTS, 2 * GiB, BPB, 64)
    assert (plan.num_blocks - 1) * BPB == 8 * GiB
