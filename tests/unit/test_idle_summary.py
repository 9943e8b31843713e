"""The prefix-cache summary an engine publishes when it goes idle holds its last requests' blocks.

The summary is rebuilt at most every SUMMARY_PERIOD_S while steps run; the process worker sends
it only when rebuilt, and an idle engine sends nothing. A request that finished within that
period of the last rebuild used to stay out of the summary for as long as the replica idled, so a
chat's next turn, arriving a few seconds later, found no prefix there. Each summary carries
the wall-clock time it was built: the router keeps its own record of a completed request's
prefixes until a summary built after the completion reaches it."""
from __future__ import annotations

import asyncio
import time

from replica import Engine, EngineConfig, GenerationRequest, SamplingParams
from replica.block_hash import prefix_summary
from replica.sequence import Sequence
from replica.worker import EngineCore

BLOCK = 8
PROMPT = list(range(3, 3 + 4 * BLOCK + 5))      # 4 full blocks: summary depths 1, 2 and 4


def _expected() -> set[int]:
    return {h for _, h in prefix_summary(PROMPT, BLOCK)}


def test_the_step_that_goes_idle_publishes_a_fresh_summary():
    core = EngineCore(EngineConfig(model="random:tiny", device="cpu", max_seq_len=128, block_size=BLOCK,
                                   batch_buckets=(1, 2), engine_process="thread"))
    assert not core.stats().prefix_hashes and not core.summary_due()   # just rebuilt: not due for 0.5 s
    submitted = time.time()
    core.scheduler.submit(Sequence("r", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True), 0))
    sent = []
    while core.has_work():                                  # the process worker's loop body
        sent.append(core.step_and_stats(core.summary_due())[1])
    assert sent[-1].running == 0 and sent[-1].finished_requests == 1
    assert _expected() <= set(sent[-1].prefix_hashes)      # a rebuild although none was due
    assert all(s.prefix_hashes is None for s in sent[:-1]), "rebuilt mid-request: the test ran too slowly"
    assert sent[-1].prefix_summary_time >= submitted                # when it was built, wall clock
    assert all(s.prefix_summary_time == 0.0 for s in sent[:-1])     # none sent: none timed


def test_a_thread_engine_s_stats_after_a_request_hold_its_prefix():
    engine = Engine(EngineConfig(model="random:tiny", device="cpu", max_seq_len=128, block_size=BLOCK,
                                 batch_buckets=(1, 2), engine_process="thread"))
    try:
        engine.stats()

        async def go():
            req = GenerationRequest(prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=3, ignore_eos=True))
            return [c async for c in engine.generate(req)]
        asyncio.run(go())
        s = engine.stats()
        assert s.running == 0 and _expected() <= set(s.prefix_hashes)
    finally:
        engine.shutdown()
