"""The rates an engine publishes (`decode_step_s`, `prefill_tokens_per_s`) are its own steps' times.

CPU engine with the model stubbed out by forwards that sleep a known time per kind of step: a
pure-decode step `DECODE_S`, a mixed (prefill) step `MIXED_S`. On CPU `launch(k+1)` runs before
`collect(k)`, so timing a step from one collect to the next measures the step after it: a
prefill step then "took" a decode step's time (a rate many times too high) and the last decode
step of a request took ~0. The published values must match the sleeps.
"""
from __future__ import annotations

import time

import torch

from replica import EngineConfig, SamplingParams
from replica.measured import MIN_SAMPLES
from replica.sequence import Sequence
from replica.worker import MIN_RATE_PREFILL_TOKENS, EngineCore

DECODE_S, MIXED_S = 0.004, 0.040
PROMPT = MIN_RATE_PREFILL_TOKENS + 44   # one mixed step each (the step budget holds it)


def _timed_stub(core: EngineCore) -> None:
    model, vocab = core.runner.model, core.runner.model.shape.vocab_size

    def decode(*args, **kw):
        time.sleep(DECODE_S)
        args[-1].zero_()

    def forward_mixed(tokens, positions, slots, meta, kv, logit_rows):
        time.sleep(MIXED_S)
        return torch.zeros(logit_rows.shape[0], vocab)
    model.decode, model.forward_mixed = decode, forward_mixed


def test_published_step_times_are_each_step_s_own():
    core = EngineCore(EngineConfig(model="random:tiny", device="cpu", max_seq_len=512, batch_buckets=(1, 2),
                                   step_token_budget=1024))
    _timed_stub(core)
    for i in range(MIN_SAMPLES):   # one request at a time: prefill, then 5 decode steps at bucket 1
        core.scheduler.submit(Sequence(f"r{i}", [7 + i] * PROMPT,
                                       SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), i))
        while core.has_work():
            core.step()
    stats = core.stats()
    assert stats.mixed_steps == MIN_SAMPLES and set(stats.decode_step_s) == {1}
    assert DECODE_S <= stats.decode_step_s[1] < DECODE_S + 0.5 * MIXED_S, stats.decode_step_s
    rate = stats.prefill_tokens_per_s
    assert PROMPT / (2 * MIXED_S) < rate <= PROMPT / MIXED_S, rate
