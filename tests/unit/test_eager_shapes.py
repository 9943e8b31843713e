"""The row counts an eager mixed step runs its matmuls at (`model_runner.eager_rows`), and the
GEMM shapes the runner warms at startup (`ModelRunner.eager_gemms`): every shape a step can
launch, from few enough counts that warming them all is cheap."""
from __future__ import annotations

from replica import EngineConfig
from replica.model_runner import EAGER_COARSE_FROM, EAGER_COARSE_ROWS, EAGER_MIXED_ROWS, LOGIT_ROWS, eager_rows
from replica.worker import EngineCore


def test_eager_rows_pads_little_and_to_few_counts():
    counts = set()
    for n in range(1, 16385):
        rows = eager_rows(n)
        step = EAGER_MIXED_ROWS if n <= EAGER_COARSE_FROM else EAGER_COARSE_ROWS
        assert n <= rows < n + step and rows % step == 0, n
        assert rows - n < max(EAGER_MIXED_ROWS, 0.07 * n), n          # padding: under 7% of the step
        counts.add(rows)
    assert eager_rows(EAGER_COARSE_FROM) == EAGER_COARSE_FROM and eager_rows(EAGER_COARSE_FROM + 1) == 2176
    assert len(counts) == EAGER_COARSE_FROM // EAGER_MIXED_ROWS + (16384 - EAGER_COARSE_FROM) // EAGER_COARSE_ROWS


def test_eager_gemms_cover_every_step_the_runner_can_build():
    core = EngineCore(EngineConfig(model="random:tiny", device="cpu", max_seq_len=256,
                                   step_token_budget=2304, engine_process="thread"))
    r = core.runner
    calls = r.eager_gemms()
    layer = {name: {rows for nm, _, _, rows in calls if nm == name} for name in ("wqkv", "wo", "w13", "w2")}
    assert all(rows == layer["wqkv"] for rows in layer.values())       # the four GEMMs at each count
    # CPU has no mixed graphs: every count from 1 token to the budget plus a decode row per sequence
    assert layer["wqkv"] == {eager_rows(n) for n in range(1, r.step_token_budget + r.rows + 1)}
    lm = sorted(rows for nm, _, _, rows in calls if nm == "lm_head")
    assert lm == list(range(LOGIT_ROWS, lm[-1] + 1, LOGIT_ROWS)) and lm[-1] >= r.rows   # a logit row per sequence
    inputs = r.gemm_inputs(calls)
    L = r.model.layers[0]
    assert set(inputs) == {L.wqkv.shape[1], L.w2.shape[1]}
    assert all(x.shape[0] == max(layer["wqkv"] | set(lm)) for x in inputs.values())
