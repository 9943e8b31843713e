"""The decode split rule (replica.kernels.paged_attention.decode_split): the launch contract the
graphs rely on, over every bucket and table width the engine uses."""
from __future__ import annotations

import pytest

pytest.importorskip("triton")
from replica.kernels import paged_attention as PA  # noqa: E402

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 1024)


@pytest.mark.parametrize("kvh", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("max_len", [64, 2048, 8192, 32768, 131072])
@pytest.mark.parametrize("block_n", [16, 64])
def test_split_is_a_power_of_two_tile_multiple_within_the_grid_cap(kvh, max_len, block_n):
    for b in BUCKETS:
        split = PA.decode_split(b, kvh, max_len, block_n)
        assert split & (split - 1) == 0 and split % block_n == 0
        num_splits = -(-max_len // split)
        assert b * kvh * num_splits <= PA.GRID_CAP
        assert split <= max(block_n, 2 * max_len)          # never wider than the table needs


@pytest.mark.parametrize("kvh", [1, 2, 4, 8])
def test_split_grows_with_the_grid_it_spreads_over(kvh):
    splits = [PA.decode_split(b, kvh, 8192, 64) for b in BUCKETS]
    assert splits == sorted(splits)
    assert splits[-1] == PA.MAX_SPLIT


def test_small_grids_take_short_splits():
    """Few rows x KV heads: short splits, so a short context still spreads over many programs
    (the sweep's worst case under the old rule: qwen2-0.5b's 2 KV heads at 64 rows of 448
    tokens ran one 512-token split per row, x1.40 of the best split)."""
    assert PA.decode_split(1, 2, 8192, 64) == 64
    assert PA.decode_split(32, 2, 8192, 64) == PA.SMALL_GRID_SPLIT
    assert PA.decode_split(64, 2, 8192, 64) == 256
    assert PA.decode_split(8, 8, 8192, 64) == PA.SMALL_GRID_SPLIT
    assert PA.decode_split(512, 8, 8192, 64) == PA.MAX_SPLIT
