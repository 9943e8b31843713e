"""The worker: `EngineCore`, the one step loop body, and `ThreadWorker`, which runs it in a thread.

`EngineCore.step()` = schedule step k+1 -> launch it -> collect step k (the one host wait, while
k+1 runs on the GPU) -> postprocess k -> events. One step stays in flight, so the host's
bookkeeping hides behind the GPU; a sequence's next input is taken on the device from the step in
flight (replica/batch.py `src`).

Launchers (same contract: `submit(Sequence)`, `abort(id)`, `stats()`, `check_health()`,
`wait_ready()`, `shutdown()`; events go to `on_events(StepEvents)` on a background thread of this
process):
- `ThreadWorker` (here): a thread of this process (CPU tests, in-process benchmarks; no start-up cost);
- `ProcessWorker` (replica/process_worker.py): a child process of its own (servers on CUDA).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from replica.batch import StepBatch
from replica.blocks import BlockPool
from replica.config import EngineConfig
from replica.measured import Measured
from replica.scheduler import EngineOverloadedError, Scheduler
from replica.sequence import Sequence, StepEvents
from replica.stats import EngineStats
from replica.tokenizer import load_tokenizer

if TYPE_CHECKING:   # torch: imported by EngineCore, never by a parent that only runs ProcessWorker
    from replica.model_runner import InFlight

MAX_SUMMARY = 4096

log = logging.getLogger("replica")
STALL_SECONDS = 60.0
OnEvents = Callable[[StepEvents], None]
OnFailure = Callable[[BaseException], None]
OVERLOADED = "overloaded"      # finish_reason of an Event for a submit the child's queue refused
SUMMARY_PERIOD_S = 0.5         # how often the prefix-cache summary in stats is rebuilt
# A mixed step with fewer prompt tokens than this does not update the prefill rate: its time is
# the decode rows' (a 100-token prompt beside 80 rows "measured" 12k tokens/s where a 2k-token
# step measures 50k on llama-8b), and the router would over-value cache hits and empty replicas.
MIN_RATE_PREFILL_TOKENS = 256
REMAP_EVERY_STEPS = 16   # decode steps between two looks for a faster larger bucket (graphs.prefer_faster)
__all__ = ["EngineDeadError", "EngineOverloadedError", "ThreadWorker", "EngineCore"]


class EngineDeadError(RuntimeError):
    """The engine was shut down or its step loop failed; the request cannot run."""


@dataclass(frozen=True)
class EngineInfo:
    """What the front end needs to validate requests, known once the core is built."""
    vocab_size: int
    max_seq_len: int
    block_size: int
    num_eos_ids: int       # how many EOS ids the model declares (what min_tokens holds back)


class EngineCore:
    """Scheduler + model runner + the step in flight. Single-threaded but for `submit`/`abort`."""

    def __init__(self, config: EngineConfig):
        from replica.model_runner import ModelRunner   # torch
        self.config = c = config
        self.runner = r = ModelRunner(config)
        eos = set(load_tokenizer(c.model).eos_token_ids)
        gen_eos = getattr(r.hf_config, "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.pool = BlockPool(r.plan.num_blocks, c.block_size, c.enable_prefix_cache)
        self.scheduler = Scheduler(self.pool, r.rows, r.max_decode_rows, c.max_seq_len, r.step_token_budget,
                                   eos, c.max_queued_requests, c.admission_window_s)
        self.info = EngineInfo(r.vocab_size, c.max_seq_len, c.block_size, len(eos))
        self._inflight: Optional[tuple[StepBatch, "InFlight"]] = None
        self._last_done = time.perf_counter()
        self.steps = collections.Counter()          # (bucket, path) -> decode steps
        self.padded = collections.Counter()         # bucket -> padding rows
        self.tokens = collections.Counter()  # mixed_steps, mixed_graph_steps, prefill_tokens, mixed_decode_rows
        self.decode_step_s: dict[int, Measured] = collections.defaultdict(Measured)   # bucket ->
        self.prefill_rate = Measured()                   # prompt tokens / s of mixed steps
        self._summary: tuple[int, ...] = ()
        self._summary_at = 0.0
        self._summary_time = 0.0                        # the same moment, wall clock (published)
        self._backlog = self._decode_rows = 0           # O(rows) to count: refreshed with the summary
        self._min_remaining = 0
        self.startup = r.startup

    def mark_ready(self, process_s: float, ready_s: float, imports_s: float = 0.0) -> None:
        self.startup = dataclasses.replace(self.runner.startup, process_seconds=process_s,
                                           imports_seconds=imports_s, ready_seconds=ready_s)
        st = self.startup
        log.info("engine ready in %.2f s (process %.2f of which imports %.2f, device init %.2f, load %.2f, "
                 "sizing %.2f with compiles %.2f, warm-up %.2f, capture %.2f)", ready_s, process_s,
                 imports_s, st.device_init_seconds, st.load_seconds, st.sizing_seconds,
                 st.compile_seconds, st.warmup_seconds, st.capture_seconds)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def step(self) -> StepEvents:
        events = StepEvents()
        batch = self.scheduler.schedule(events.other)
        launched = (batch, self.runner.launch(batch)) if batch else None
        if self._inflight is not None:
            prev_batch, prev = self._inflight
            tokens, logprobs = self.runner.collect(prev)
            self._account(prev_batch, prev)
            self.scheduler.postprocess(prev_batch, tokens, logprobs, events)
        self._inflight = launched
        return events

    def _account(self, batch: StepBatch, step: "InFlight") -> None:
        """Counters and measured rates of a step that just finished. Its time on CUDA: from when
        the device could start it (launched, and the step before seen done) until the host saw it
        done. On CPU `launch` ran it to completion, and `collect(k)` follows `launch(k+1)`, so the
        time between two collects would be the *next* step's: there it is the launch itself."""
        now = time.perf_counter()
        if step.event is None:
            seconds = step.launched_at - step.started_at
        else:
            seconds = now - max(self._last_done, step.launched_at)
        seconds, self._last_done = max(seconds, 1e-6), now
        if step.kind == "mixed":
            self.tokens["mixed_steps"] += 1
            self.tokens["mixed_graph_steps"] += step.bucket > 0
            self.tokens["prefill_tokens"] += batch.prefill_tokens
            self.tokens["mixed_decode_rows"] += len(batch.decode)
            if batch.prefill_tokens >= MIN_RATE_PREFILL_TOKENS:
                self.prefill_rate.add(batch.prefill_tokens / seconds)
        else:
            self.steps[(step.bucket, step.kind)] += 1
            self.padded[step.bucket] += step.bucket - len(batch.decode)
            self.decode_step_s[step.bucket].add(seconds)
            if self.steps.total() % REMAP_EVERY_STEPS == 0:
                self.runner.graphs.prefer_faster({b: m.value for b, m in self.decode_step_s.items()})

    def abort_all(self) -> StepEvents:
        self._inflight = None
        return self.scheduler.abort_all()

    def summary_due(self) -> bool:
        return time.monotonic() - self._summary_at > SUMMARY_PERIOD_S

    def refresh_summary(self) -> None:
        """Rebuild the prefix-cache summary and the O(rows) counts now (`stats` does it at most
        every SUMMARY_PERIOD_S). The workers call it when the engine goes idle: the last snapshot
        then holds every block its last requests left, for as long as it stays idle."""
        sch = self.scheduler
        self._summary, self._summary_at = self.pool.summary(MAX_SUMMARY), time.monotonic()
        self._summary_time = time.time()
        self._backlog, self._decode_rows = sch.backlog_tokens(), sch.decode_rows()
        self._min_remaining = sch.min_remaining_steps()

    def step_and_stats(self, summary: bool = True) -> tuple[StepEvents, EngineStats]:
        """One step, then the snapshot after it (the workers' loop body). Going idle refreshes the
        summary (`refresh_summary`); without `summary` the snapshot carries none unless that
        happened (the process worker sends it only when rebuilt)."""
        events = self.step()
        idle = not self.has_work()
        if idle:
            self.refresh_summary()
        return events, self.stats(summary or idle)

    def stats(self, summary: bool = True) -> EngineStats:
        """A snapshot; with `summary`, the prefix-cache summary too (rebuilt at most every
        SUMMARY_PERIOD_S), else `prefix_hashes=None` (the process worker's parent keeps the last).
        The owning thread's call: it reads the scheduler's containers."""
        sch, r, pool, c = self.scheduler, self.runner, self.pool, self.config
        if summary and self.summary_due():
            self.refresh_summary()
        return EngineStats(
            captured_buckets=r.graphs.captured_buckets if r.graphs.use_graphs else r.plan.buckets,
            graphs=r.graphs.use_graphs, max_seq_len=c.max_seq_len, max_num_seqs=r.rows,
            running=len(sch.running), free_slots=sch.free_rows, queued=sch.queued, fallback=c.fallback,
            max_queued=c.max_queued_requests, block_size=c.block_size, total_blocks=pool.num_blocks,
            free_blocks=pool.num_free, cached_blocks=pool.num_cached,
            prefill_backlog_tokens=self._backlog, decode_rows=self._decode_rows,
            decode_steps=dict(self.steps), padded_rows=dict(self.padded),
            mixed_steps=self.tokens["mixed_steps"], mixed_graph_steps=self.tokens["mixed_graph_steps"],
            prefill_tokens=self.tokens["prefill_tokens"],
            mixed_decode_rows=self.tokens["mixed_decode_rows"],
            generated_tokens=sch.counters["generated_tokens"], prompt_tokens=sch.counters["prompt_tokens"],
            prefix_queried_tokens=pool.counters.queried_tokens, prefix_hit_tokens=pool.counters.hit_tokens,
            preemptions=sch.counters["preemptions"], finished_requests=sch.counters["finished_requests"],
            aborted_requests=sch.counters["aborted_requests"],
            prefill_tokens_per_s=self.prefill_rate.value,
            decode_step_s=self._published_step_s(),
            mean_output_tokens=sch.mean_output_tokens, min_remaining_steps=self._min_remaining,
            prefix_hashes=self._summary if summary else None,
            prefix_summary_time=self._summary_time if summary else 0.0, startup=self.startup)

    def _published_step_s(self) -> dict[int, float]:
        """bucket -> measured step seconds of the bucket its batches run at: a bucket handed to a
        faster larger one (graphs.prefer_faster) publishes that one's time, which is what a batch
        landing there now costs."""
        measured = {b: m.value for b, m in self.decode_step_s.items() if m.value}
        faster = self.runner.graphs.faster
        return {b: measured.get(faster.get(b, b), t) for b, t in measured.items()}


class ThreadWorker:
    def __init__(self, config: EngineConfig, on_events: OnEvents, on_failure: OnFailure):
        t0 = time.perf_counter()
        self.core = EngineCore(config)
        self.core.mark_ready(process_s=0.0, ready_s=time.perf_counter() - t0)
        self.info = self.core.info
        self._on_events, self._on_failure = on_events, on_failure
        self._wake = threading.Condition()
        self._stopping = False
        self.error: Optional[BaseException] = None
        self._in_step_since: Optional[float] = None
        self._stats = self.core.stats()    # replaced by the step thread after every step
        self._thread = threading.Thread(target=self._run, name="graphserve-step", daemon=True)
        self._thread.start()

    def wait_ready(self) -> None:
        """Ready once constructed (the core is built in the constructor)."""

    def submit(self, seq: Sequence) -> None:
        self.core.scheduler.submit(seq)     # raises EngineOverloadedError past the queue bound
        self._notify()

    def abort(self, request_id: str) -> None:
        self.core.scheduler.abort(request_id)
        self._notify()

    def stats(self) -> EngineStats:
        """The snapshot the step thread took after its last step (it alone reads the scheduler)."""
        return self._stats

    def check_health(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"step loop failed: {self.error!r}") from self.error
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError("step loop is not running")
        since = self._in_step_since
        if since is not None and time.monotonic() - since > STALL_SECONDS:
            raise EngineDeadError(f"one engine step has run for over {STALL_SECONDS:.0f} s")

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self.core.has_work():
                        self._wake.wait(timeout=1.0)
                    if self._stopping:
                        break
                self._in_step_since = time.monotonic()
                events, self._stats = self.core.step_and_stats()
                self._in_step_since = None
                if events:
                    self._on_events(events)
            self._on_events(self.core.abort_all())
            self._stats = self.core.stats()
        except BaseException as e:  # noqa: BLE001 - the loop must report any failure to its waiters
            log.exception("engine step loop failed")
            self.error = e
            self._on_failure(e)
