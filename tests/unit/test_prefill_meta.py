"""PrefillMeta (replica/kernels/prefill_meta.py), on the host: the prefill attention's tile map
covers every query row exactly once, long key ranges split into segments that follow the step's
size, and bad arguments raise."""
from __future__ import annotations

import pytest
import torch

import replica.kernels as K


def test_prefill_meta_tile_map_covers_every_query_row_once():
    q_lens, kv_lens, rows = [1, 70, 3, 1, 32, 33], [50, 70, 10, 1, 100, 33], [4, 0, 2, 7, 1, 3]
    meta = K.PrefillMeta.build(q_lens, kv_lens, rows, "cpu", tile_tokens=16)
    assert (meta.q_lens, meta.kv_lens, meta.table_rows) == (tuple(q_lens), tuple(kv_lens), tuple(rows))
    assert meta.num_tokens == 140 and meta.max_kv_len == 100 and meta.tile_tokens == 16
    assert meta.packed.dtype == torch.int32
    assert meta.prefill_tiles.shape == (meta.num_prefill_tiles, 7) and meta.decode_tiles.shape == (2, 7)
    # every section starts 16-byte aligned (Triton compiles a pointer's alignment into the kernel)
    for section in (meta.prefill_tiles, meta.decode_tiles, meta.prefill_merges, meta.decode_merges):
        assert (section.data_ptr() - meta.packed.data_ptr()) % 16 == 0
    assert meta.num_decode_tiles == 2 and meta.num_prefill_tiles == 5 + 1 + 2 + 3
    assert meta.num_prefill_merges == meta.num_decode_merges == 0  # short: no key segments
    starts = [0, 1, 71, 74, 75, 107]
    seen = torch.zeros(meta.num_tokens, dtype=torch.int32)
    for kind, tiles, tok in (("prefill", meta.prefill_tiles, 16), ("decode", meta.decode_tiles, 1)):
        kv_order = []
        for t0, n, p0, row, k0, k1, part in tiles.tolist():
            c = max(i for i in range(6) if starts[i] <= t0)
            assert (q_lens[c] == 1) == (kind == "decode") and row == rows[c] and 1 <= n <= tok
            assert p0 == kv_lens[c] - q_lens[c] + (t0 - starts[c])  # position of the first token
            assert (k0, k1, part) == (0, p0 + n, -1)
            seen[t0: t0 + n] += 1
            kv_order.append((kv_lens[c], p0))
        assert kv_order == sorted(kv_order, reverse=True)  # longest chunk, heaviest tile first
    assert seen.eq(1).all()


def test_prefill_meta_key_segments():
    """Split tiles: segments partition keys 0 .. p0+n-1, cut only below p0 + 1 (every token sees a
    key of every segment), consecutive partial indices, one merge row per split tile."""
    meta = K.PrefillMeta.build([8, 1, 1, 40], [68, 200, 64, 40], [0, 1, 2, 3], "cpu",
                               tile_tokens=8, segment=64)
    assert meta.prefill_segment == meta.decode_segment == 64
    merges = {}
    for tiles, merge_rows in ((meta.prefill_tiles, meta.prefill_merges),
                              (meta.decode_tiles, meta.decode_merges)):
        segs = {}
        for t0, n, p0, row, k0, k1, part in tiles.tolist():
            segs.setdefault((t0, n, p0), []).append((k0, k1, part))
        for (t0, n, p0), parts in segs.items():
            assert parts[0][0] == 0 and parts[-1][1] == p0 + n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert all(k0 <= p0 and k0 % 64 == 0 for k0, _, _ in parts)
            if len(parts) == 1:
                assert parts[0][2] == -1
            else:
                ids = [p for _, _, p in parts]
                assert ids == list(range(ids[0], ids[0] + len(ids)))
                merges[(t0, n)] = (ids[0], len(ids))
        for t0, n, part0, nseg, *_ in merge_rows.tolist():
            assert merges.pop((t0, n)) == (part0, nseg)
    assert not merges
    # (8 tokens at 60..67): p0 + 1 = 61 <= 64, so no cut at 64 (tokens 60..63 would see no key)
    assert meta.prefill_tiles[:, 6].tolist().count(-1) == 6 and meta.num_decode_merges == 1
    assert meta.num_decode_parts == 4 and meta.num_prefill_merges == 0


def test_prefill_meta_default_segments_follow_the_step():
    long_prefix = K.PrefillMeta.build([128], [128 + 32640], [0], "cpu")  # 4 tiles, 32k keys each
    assert long_prefix.prefill_segment == 4096 and long_prefix.num_prefill_merges == 4
    assert long_prefix.num_prefill_tiles == 4 * 8
    big = K.PrefillMeta.build([2048], [2048 + 30720], [0], "cpu")      # 64 tiles of ~31k keys
    assert big.prefill_segment == 4096 and big.num_prefill_merges == 64
    huge = K.PrefillMeta.build([2048] * 8, [2048 + 30720] * 8, range(8), "cpu")
    assert huge.prefill_segment == 32768 and huge.num_prefill_merges == 0  # 512 tiles already
    mixed = K.PrefillMeta.build([512] * 4 + [1] * 200, [512] * 4 + [1024] * 200, range(204), "cpu")
    assert mixed.num_prefill_merges == mixed.num_decode_merges == 0


@pytest.mark.parametrize("q_lens,kv_lens,rows,kw", [
    ([2], [1], [0], {}), ([0], [3], [0], {}), ([1, 2], [1], [0], {}), ([], [], [], {}),
    ([1], [1], [-1], {}), ([1], [1], [0], {"tile_tokens": 24}), ([1], [1], [0], {"segment": 32}),
])
def test_prefill_meta_rejects_bad_arguments(q_lens, kv_lens, rows, kw):
    with pytest.raises(ValueError):
        K.PrefillMeta.build(q_lens, kv_lens, rows, "cpu", **kw)
