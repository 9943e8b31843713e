"""The GPU tier's replay-vs-eager harness (tests/engine_helpers.py) exercised on CPU, where the
"replay" is the eager decode step: it must run the engine's real prefill and decode path, land in
the expected bucket, and give identical results both times."""
import torch

from engine_helpers import replay_vs_eager
from replica import EngineConfig, SamplingParams
from replica.worker import EngineCore


def test_harness_runs_a_real_decode_step_on_cpu():
    core = EngineCore(EngineConfig(model="random:tiny", device="cpu", batch_buckets=(1, 2, 4, 8),
                                   max_seq_len=64, block_size=4))
    prompts = [[1, 2, 3], list(range(10, 30)), [7], [9, 9, 9, 9, 9]]
    for params in (SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                   SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=1, logprobs=2,
                                  repetition_penalty=1.3, ignore_eos=True)):
        step, (tok_r, log_r), (tok_e, log_e) = replay_vs_eager(core, prompts, params)
        assert step.kind == "eager" and step.bucket == 4
        assert torch.equal(tok_r, tok_e) and torch.equal(log_r, log_e)
        assert log_r.abs().sum() > 0
    assert core.pool.leaked() == 0
