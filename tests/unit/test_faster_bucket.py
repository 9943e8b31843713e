"""A decode batch goes to a larger bucket when that bucket's measured step is shorter by enough
(`DecodeGraphs.prefer_faster`, fed by the engine's measured step times every REMAP_EVERY_STEPS
decode steps). llama-8b on H200 needs it: its 448-row step is ~2 ms slower than its 512-row step
(cuBLAS's kernel for the w13 GEMM at M=448; results/decode_shapes-8b-h200-2026-11-30.json)."""
from __future__ import annotations

import time

import pytest

from replica import EngineConfig, SamplingParams
from replica.graphs import FASTER_ABS_S, DecodeGraphs
from replica.sequence import Sequence
from replica.worker import REMAP_EVERY_STEPS, EngineCore

LADDER = (128, 256, 320, 384, 448, 512)
MS = 1e-3


class _Step:   # DecodeGraphs reads only the model's device
    class model:
        class device:
            type = "cuda"


def _graphs(step_s: dict[int, float]) -> DecodeGraphs:
    g = DecodeGraphs(_Step, LADDER, use_graphs=True)
    g.prefer_faster(step_s)
    return g


def test_a_slow_shape_hands_its_batches_to_the_faster_larger_bucket():
    g = _graphs({320: 14.5 * MS, 384: 17.0 * MS, 448: 22.8 * MS, 512: 21.2 * MS})
    assert g.bucket_for(400) == 512 and g.bucket_for(448) == 512
    assert g.bucket_for(384) == 384 and g.bucket_for(300) == 320   # 384 is faster than 512: kept
    assert g.bucket_for(600) is None                               # past the largest: unchanged


def test_the_fastest_larger_bucket_is_chosen():
    g = _graphs({256: 30 * MS, 320: 20 * MS, 384: 22.5 * MS, 512: 22 * MS})   # 384 within 5% of 512
    assert g.bucket_for(200) == 320 and g.bucket_for(384) == 384


@pytest.mark.parametrize("step_s", [
    {448: 21.0 * MS, 512: 20.2 * MS},              # 4% faster: not enough
    {128: 0.40 * MS, 256: 0.30 * MS},              # 25% but 0.1 ms: host jitter, not a shape
    {448: 22.8 * MS, 512: 0.0},                    # the larger bucket is not measured yet
    {448: 22.8 * MS},
])
def test_small_or_unmeasured_differences_change_nothing(step_s):
    g = _graphs(step_s)
    assert g.faster == {} and g.bucket_for(400) == 448 and g.bucket_for(200) == 256


def test_without_graphs_nothing_moves():
    g = DecodeGraphs(_Step, LADDER, use_graphs=False)
    g.prefer_faster({448: 22.8 * MS, 512: 21.2 * MS})
    assert g.bucket_for(400) == 448


def test_the_engine_feeds_its_measured_step_times():
    """Stub model: a 2-row step sleeps SLOW_S, a 4-row step FAST_S. After 4-row steps are measured,
    a 2-row batch runs at bucket 4 (padding counted) within REMAP_EVERY_STEPS decode steps."""
    slow_s, fast_s = 0.012, 0.004
    assert slow_s - fast_s > FASTER_ABS_S
    core = EngineCore(EngineConfig(model="random:tiny", device="cpu", max_seq_len=256, batch_buckets=(1, 2, 4),
                                   step_token_budget=1024))
    core.runner.graphs.use_graphs = True   # eager steps, timed as graph steps would be (no capture on CPU)

    def decode(tokens, positions, slots, table_rows, kv, logits_out):
        time.sleep(slow_s if tokens.shape[0] == 2 else fast_s)
        logits_out.zero_()
    core.runner.model.decode = decode

    def run(n_rows: int, tokens: int, tag: str) -> None:
        for i in range(n_rows):
            core.scheduler.submit(Sequence(f"{tag}{i}", [5 + i] * 8,
                                           SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), i))
        while core.has_work():
            core.step()

    run(4, 8, "four")          # 4-row steps (and a few smaller ones as rows finish together)
    run(2, 8, "two")           # 2-row steps: measured slow
    before = core.stats()
    assert before.decode_step_s[2] > before.decode_step_s[4] + FASTER_ABS_S
    run(2, 2 * REMAP_EVERY_STEPS, "again")
    after = core.stats()
    moved = after.decode_steps[(4, "eager")] - before.decode_steps[(4, "eager")]
    assert moved >= REMAP_EVERY_STEPS, (before.decode_steps, after.decode_steps)
    assert after.padded_rows[4] - before.padded_rows[4] == 2 * moved
    # the router reads what a 2-row batch costs now: bucket 4's time, not the stale slow one
    assert after.decode_step_s[2] == after.decode_step_s[4] < before.decode_step_s[2]
