"""The step token budget: given, or sized so that a full mixed step's matmuls come to STEP_FLOPS
(replica/sizing.py `step_budget`), and the engine schedules with the resolved value."""
from __future__ import annotations

import pytest

from replica import EngineConfig
from replica.models.llama import ModelShape
from replica.presets import preset_config
from replica.sizing import STEP_FLOPS, STEP_TOKENS_MAX, STEP_TOKENS_MIN, step_budget
from replica.worker import EngineCore


def _params(preset: str) -> int:
    return ModelShape.from_hf_config(preset_config(f"random:{preset}", 2048)).matmul_params


def test_matmul_params_of_the_presets():
    assert _params("llama-8b") == 7_504_658_432     # Llama-3.1-8B: 6.98e9 in the layers + lm_head 0.53e9
    assert _params("llama-1b") == 1_235_746_816     # Llama-3.2-1B, tied lm_head counted once


@pytest.mark.parametrize("preset, tokens", [("llama-8b", 2560), ("llama-1b", 16128), ("tiny", STEP_TOKENS_MAX)])
def test_cuda_budget_makes_steps_of_equal_matmul_work(preset, tokens):
    p = _params(preset)
    got = step_budget(EngineConfig(model=f"random:{preset}"), p, cuda=True)
    assert got == tokens and got % 256 == 0 and STEP_TOKENS_MIN <= got <= STEP_TOKENS_MAX
    if STEP_TOKENS_MIN < got < STEP_TOKENS_MAX:
        assert 2 * p * got <= STEP_FLOPS < 2 * p * (got + 256)


def test_a_given_budget_wins_and_cpu_keeps_2048():
    assert step_budget(EngineConfig(model="random:llama-8b", step_token_budget=777), _params("llama-8b"), True) == 777
    assert step_budget(EngineConfig(model="random:llama-1b"), _params("llama-1b"), cuda=False) == 2048


def test_the_scheduler_gets_the_resolved_budget():
    core = EngineCore(EngineConfig(model="random:tiny", device="cpu", max_seq_len=128, batch_buckets=(1, 2)))
    assert core.runner.step_token_budget == 2048 == core.scheduler.budget
    core = EngineCore(EngineConfig(model="random:tiny", device="cpu", max_seq_len=128, batch_buckets=(1, 2),
                                   step_token_budget=40))
    assert core.runner.step_token_budget == 40 == core.scheduler.budget


def test_the_startup_probe_fills_a_budget_longer_than_a_sequence():
    """The sizing probe's mixed step (CUDA startup) carries the whole budget in chunks no longer
    than max_seq_len - 1: a 1B budget (16128) exceeds max_seq_len 8192."""
    from replica.kv_cache import PagedKVCache
    core = EngineCore(EngineConfig(model="random:tiny", device="cpu", max_seq_len=100, batch_buckets=(1, 2),
                                   step_token_budget=250))
    r, s = core.runner, core.runner.model.shape
    kv = PagedKVCache(2, 16, s.num_layers, s.num_kv_heads, s.head_dim, 4, 100, r.dtype, r.device)
    logits = r._mixed_probe(kv)
    assert logits.shape == (1 + 3, s.vocab_size)        # the decode row + chunks of 99, 99, 52
    assert logits.isfinite().all()
