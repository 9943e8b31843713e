"""The replica side without Ray: PromptBatch expansion, BatchRunner (merging, failure, abort on
cancel), ReplicaMetrics (counter deltas) and the routing stats LLMReplica publishes."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from deployments.batch_runner import BatchRunner
from deployments.llm_replica import LLMReplica
from deployments.protocol import PromptBatch
from deployments.replica_metrics import ReplicaMetrics
from replica.sampling_params import InvalidRequestError, SamplingParams
from router import metrics as catalog
from router.stats import ReplicaStats
from router_fakes import no_ray_init  # noqa: F401 - autouse guard
from test_deployments_fakes import FAIL_AFTER_FIRST, HANG, REFUSE, FakeEngine


def batch(*prompts, n=1, max_tokens=3, seed=None) -> PromptBatch:
    return PromptBatch(tuple(prompts), SamplingParams(max_tokens=max_tokens, seed=seed), n=n,
                       request_id="b")


def run(coro):
    return asyncio.run(coro)


def test_sequences_are_prompt_major_and_n_samples_get_distinct_seeds():
    reqs = batch("x", (7, 8), n=2, seed=5).requests()
    assert [r.request_id for r in reqs] == ["b-0", "b-1", "b-2", "b-3"]
    assert [r.prompt for r in reqs] == ["x", "x", None, None]
    assert reqs[2].prompt_token_ids == (7, 8)
    assert [r.params.seed for r in reqs] == [5, 6, 5, 6]


@pytest.mark.parametrize("make, message", [
    (lambda: batch(), "no prompts"),
    (lambda: batch("x", n=0), "n must be a positive integer"),
    (lambda: batch(*["x"] * 65, n=64), "at most 4096"),
])
def test_bad_batches_raise_invalid_request_error(make, message):
    with pytest.raises(InvalidRequestError, match=message):
        make()


def test_collect_orders_by_sequence_and_counts_usage_per_prompt():
    runner = BatchRunner(FakeEngine(), replica="r0")
    res = run(runner.collect(batch("ab", (1, 2, 3), n=2)))
    assert [c.index for c in res.completions] == [0, 1, 2, 3]
    assert [c.prompt_index for c in res.completions] == [0, 0, 1, 1]
    assert all(c.text == "abc" and c.token_ids == (97, 98, 99) for c in res.completions)
    assert all(c.finish_reason == "length" for c in res.completions)
    # Prompt tokens count once per prompt (2 + 3), completions once per sample (4 x 3).
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens) == (5, 12, 17)
    assert res.replica == "r0" and runner.batch_sizes == {4: 1}


def test_a_refused_sequence_fails_the_batch_and_aborts_the_others():
    engine = FakeEngine()
    with pytest.raises(InvalidRequestError, match="token ids"):
        run(BatchRunner(engine).collect(batch((1, HANG), (1, REFUSE))))
    assert engine.aborted == ["b-0"] and engine.finished == []


def test_an_engine_failure_mid_batch_is_raised_and_the_rest_aborted():
    engine = FakeEngine()
    with pytest.raises(RuntimeError, match="step failed"):
        run(BatchRunner(engine).collect(batch((1, FAIL_AFTER_FIRST), (1, HANG))))
    assert sorted(engine.aborted) == ["b-0", "b-1"]


def test_closing_the_stream_early_aborts_every_running_sequence():
    engine = FakeEngine()

    async def read_one_then_leave():
        stream = BatchRunner(engine).run(batch("a", "b", "c", max_tokens=50))
        first = await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0)   # let the cancelled sequences unwind
        return first

    first = run(read_one_then_leave())
    assert {c.index for c in first} == {0, 1, 2}
    assert sorted(engine.aborted) == ["b-0", "b-1", "b-2"] and engine.finished == []


def test_cancelling_the_caller_aborts_the_batch():
    engine = FakeEngine()

    async def cancel_midway():
        task = asyncio.create_task(BatchRunner(engine).collect(batch((1, HANG), (2, HANG))))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)   # one loop turn: the aborts happen now, not when the loop closes
        assert sorted(engine.aborted) == ["b-0", "b-1"]

    run(cancel_midway())


class FakeMetric:
    def __init__(self, spec):
        self.spec, self.calls, self.default_tags = spec, [], None

    def set_default_tags(self, tags):
        self.default_tags = tags

    def inc(self, value, tags=None):
        self.calls.append(("inc", value, tags))

    def set(self, value, tags=None):
        self.calls.append(("set", value, tags))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, tags))


def test_metrics_export_counter_deltas_and_gauges():
    made = {}
    metrics = ReplicaMetrics("m", make=lambda spec: made.setdefault(spec.name, FakeMetric(spec)))
    engine = FakeEngine()
    s1 = engine.stats()
    metrics.update(s1)
    s2 = s1.__class__(**{**s1.__dict__, "decode_steps": {(2, "eager"): 7, (4, "eager"): 1},
                         "generated_tokens": 10, "running": 0,
                         "mixed_steps": s1.mixed_steps + 4, "mixed_graph_steps": s1.mixed_graph_steps + 3})
    metrics.update(s2)
    steps = made[catalog.DECODE_STEPS.name].calls
    assert steps == [("inc", 5, {"bucket": "2", "path": "eager"}),
                     ("inc", 2, {"bucket": "2", "path": "eager"}),
                     ("inc", 1, {"bucket": "4", "path": "eager"})]
    assert made[catalog.GENERATED_TOKENS.name].calls == [("inc", 10, None)]
    assert made[catalog.MIXED_GRAPH_STEPS.name].calls == [("inc", 3, None)]
    assert made[catalog.RUNNING_SEQS.name].calls[-1] == ("set", 0, None)
    # Startup gauges are refreshed at every update: Ray drops a gauge value nobody sets again.
    assert made[catalog.CAPTURE_SECONDS.name].calls == [("set", 0.0, None)] * 2
    assert all(m.default_tags == {"model": "m"} for m in made.values())


def test_runner_observes_ttft_once_and_tpot_per_later_chunk():
    made = {}
    metrics = ReplicaMetrics("m", make=lambda spec: made.setdefault(spec.name, FakeMetric(spec)))
    run(BatchRunner(FakeEngine(), metrics).collect(batch("a", "b", max_tokens=4)))
    assert len(made[catalog.TTFT.name].calls) == 2
    assert len(made[catalog.TPOT.name].calls) == 2 * 3


def test_routing_stats_follow_the_router_contract():
    fake_self = SimpleNamespace(_engine=FakeEngine(), _device="node-a:0", _routing_stats_polls=0)
    published = LLMReplica.func_or_class.record_routing_stats(fake_self)
    stats = ReplicaStats.from_dict(published)
    assert stats is not None
    assert (stats.captured_buckets, stats.max_seq_len, stats.running, stats.free_slots,
            stats.queued, stats.device) == ((1, 2, 4), 64, 1, 3, 2, "node-a:0")
    LLMReplica.func_or_class.record_routing_stats(fake_self)
    assert fake_self._routing_stats_polls == 2          # counters() reports it: tests wait on it


def test_the_queue_bound_refuses_whole_batches_and_drops_nothing_admitted():
    from deployments.errors import ServerOverloadedError

    engine = FakeEngine()
    runner = BatchRunner(engine, max_sequences=3, retry_after_s=4)

    async def scenario():
        first = asyncio.create_task(runner.collect(batch((1, HANG), (2, HANG))))   # 2 of 3 admitted
        await asyncio.sleep(0.01)
        assert runner.admitted == 2
        with pytest.raises(ServerOverloadedError) as err:       # 2 + 2 > 3: refused as a whole
            await runner.run(batch("a", "b", max_tokens=1)).__anext__()
        assert err.value.retry_after_s == 4 and runner.refused_batches == 1
        assert len(engine.requests) == 2                        # the refused batch never reached it
        one = await runner.collect(batch("c", max_tokens=2))    # 2 + 1 fits
        assert one.completions[0].text == "ab"
        await asyncio.sleep(0)                                  # done callbacks run a turn later
        assert runner.admitted == 2
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.sleep(0)
        assert runner.admitted == 0                             # released as each sequence ends
        # An idle runner admits any batch, even one larger than the bound.
        res = await runner.collect(batch("d", "e", "f", "g", max_tokens=1))
        await asyncio.sleep(0)
        assert len(res.completions) == 4 and runner.admitted == 0

    run(scenario())


def test_admission_is_released_for_sequences_cancelled_before_they_started():
    runner = BatchRunner(FakeEngine(), max_sequences=10)

    async def scenario():
        stream = runner.run(batch((1, HANG), (2, HANG), (3, HANG)))
        task = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0)      # the batch is admitted, its tasks may not have run yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()
        await asyncio.sleep(0)
        assert runner.admitted == 0

    run(scenario())


def test_collect_gathers_logprobs_and_cached_tokens_per_sequence():
    engine = FakeEngine(cached_tokens=1)
    b = PromptBatch(("ab", "c"), SamplingParams(max_tokens=3, logprobs=1), n=2, request_id="b")
    res = run(BatchRunner(engine).collect(b))
    c = res.completions[0]
    assert [lp.token_id for lp in c.logprobs] == list(c.token_ids) == [97, 98, 99]
    assert c.logprobs[0].top == ((98, -1.0),)
    assert c.cached_tokens == 1 and res.usage.cached_tokens == 2     # once per prompt
    plain = run(BatchRunner(FakeEngine()).collect(batch("a")))
    assert plain.completions[0].logprobs is None


def test_routing_stats_carry_what_the_estimate_reads():
    """EngineStats -> record_routing_stats dict -> the router's ReplicaStats: every v2 field the
    estimate uses survives the trip (a field dropped here would silently fall back to defaults)."""
    from deployments.llm_replica import routing_stats
    from replica.stats import EngineStats
    from router.stats import ReplicaStats

    s = EngineStats(captured_buckets=(1, 2, 4), graphs=True, max_seq_len=4096, max_num_seqs=4, running=3,
                    free_slots=1, queued=2, fallback="eager", block_size=16, total_blocks=900,
                    free_blocks=700, prefill_backlog_tokens=1234, decode_rows=2, prefill_tokens_per_s=3.5e4,
                    decode_step_s={1: 0.005, 4: 0.006}, prefix_hashes=(11, 22, 33),
                    prefix_summary_time=1.7e9, mean_output_tokens=87.5, min_remaining_steps=12)
    back = ReplicaStats.from_dict(routing_stats(s).to_dict())
    assert (back.mean_output_tokens, back.min_remaining_steps) == (87.5, 12)
    assert (back.block_size, back.total_blocks, back.free_blocks, back.prefill_backlog_tokens,
            back.decode_rows, back.prefill_tokens_per_s) == (16, 900, 700, 1234, 2, 3.5e4)
    assert back.decode_step_s == {1: 0.005, 4: 0.006} and back.prefix_hashes == (11, 22, 33)
    assert back.prefix_summary_time == 1.7e9
    assert routing_stats(EngineStats((1,), False, 64, 1, 0, 1, 0, "eager", prefix_hashes=None)).prefix_hashes == ()
