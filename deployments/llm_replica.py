"""`LLMReplica`: the decode deployment, one `replica.Engine` per replica (one GPU each, or CPU).

Contract:
- `__init__` picks this replica's bucket set by its rank (`AppArgs.buckets_for_rank`), builds the
  engine on `device="auto"` (`cuda:0` is the GPU Ray pinned through CUDA_VISIBLE_DEVICES, else
  CPU) and returns only after the engine has captured its graphs: Serve does not count the
  replica as started, nor route to it, before that.
- `generate(batch, *, routing_hint=None) -> BatchResult` and `stream(batch, *, routing_hint=None)`
  (an async generator of `list[StreamChunk]`) run one `PromptBatch` through `BatchRunner`
  (failure and cancellation rules there: a refused sequence fails the batch; a caller that
  cancels or stops reading aborts every sequence in the engine). `routing_hint` is for the
  router, which reads it from the call's kwargs; the replica ignores it. Backpressure: the runner
  admits at most `max_num_seqs + AppArgs.max_queued_sequences` sequences and refuses more with
  `ServerOverloadedError` (a 429 at the ingress). Client errors it raises are logged by Serve as
  one WARNING line (`deployments.errors.ClientErrorLogFilter`).
- `record_routing_stats()` publishes `router.stats.ReplicaStats(...).to_dict()` from
  `engine.stats()`: captured buckets, rows, running, free rows, queued, KV blocks, prefill
  backlog, measured rates and the prefix-cache summary (`routing_stats`).
- `check_health()` raises when the engine's step loop is dead or stuck.
- `counters()` reports what this replica did (batch sizes received, decode steps by bucket and
  path); tests read it with `handle.broadcast("counters")`.
- metrics go through `ReplicaMetrics` (names from router/metrics.py).
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

import ray
from ray import serve

from deployments.batch_runner import BatchRunner
from deployments.config import AppArgs
from deployments.errors import install_log_filter
from deployments.protocol import BatchResult, PromptBatch, StreamChunk
from deployments.replica_metrics import ReplicaMetrics
from router.stats import ReplicaStats

log = logging.getLogger("ray.serve")
METRICS_PERIOD_S = 2.0


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def routing_stats(s: Any, device: str = "") -> ReplicaStats:
    """What the router reads (router/stats.py) from an engine's `EngineStats`; `device` names the
    GPU the replica runs on (`device_key`)."""
    return ReplicaStats(captured_buckets=tuple(s.captured_buckets), max_seq_len=s.max_seq_len,
                        max_num_seqs=s.max_num_seqs, running=s.running, free_slots=s.free_slots,
                        queued=s.queued, graphs=s.graphs, fallback=s.fallback, block_size=s.block_size,
                        total_blocks=s.total_blocks, free_blocks=s.free_blocks,
                        prefill_backlog_tokens=s.prefill_backlog_tokens, decode_rows=s.decode_rows,
                        prefill_tokens_per_s=s.prefill_tokens_per_s, decode_step_s=dict(s.decode_step_s),
                        mean_output_tokens=s.mean_output_tokens, min_remaining_steps=s.min_remaining_steps,
                        prefix_hashes=tuple(s.prefix_hashes or ()), device=device,
                        prefix_summary_time=float(getattr(s, "prefix_summary_time", 0.0) or 0.0))


def device_key() -> str:
    """"<node id>:<gpu ids>" of this replica's GPUs; "" without GPUs. Replicas at num_gpus < 1
    that share a GPU publish the same key."""
    gpus = _gpu_ids()
    return f"{ray.get_runtime_context().get_node_id()}:{','.join(sorted(gpus))}" if gpus else ""


def _gpu_ids() -> list[str]:
    return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))


@serve.deployment(name="LLMReplica", ray_actor_options={"num_cpus": 0})
class LLMReplica:
    async def __init__(self, args: AppArgs):
        install_log_filter(drop_codes=("server_overloaded",))   # the ingress logs each 429
        ctx = serve.get_replica_context()
        self._rank = ctx.rank.rank
        self._replica = ctx.replica_tag
        self._device = device_key()
        self._routing_stats_polls = 0            # counters(): tests wait until routers have stats
        config = args.engine_config(self._rank)
        started = time.perf_counter()
        self._engine = _import(args.engine_class)(config)   # loads, captures, starts the step loop
        stats = self._engine.stats()
        log.info("LLMReplica rank %d: %s ready in %.1f s on buckets %s (graphs=%s, capture %.2f s)",
                 self._rank, config.model, time.perf_counter() - started,
                 list(stats.captured_buckets), stats.graphs, stats.startup.capture_seconds)
        self._metrics = ReplicaMetrics(self._engine.model_name)
        self._metrics.update(stats)
        bound = stats.max_num_seqs + args.queued_sequences(stats.max_num_seqs)
        self._runner = BatchRunner(self._engine, self._metrics, self._replica, max_sequences=bound,
                                   retry_after_s=args.retry_after_s,
                                   stream_items_per_s=args.stream_items_per_s)
        self._metrics_task = asyncio.get_running_loop().create_task(self._export_metrics())

    # -- Serve hooks ----------------------------------------------------------------------------
    def record_routing_stats(self) -> dict[str, Any]:
        self._routing_stats_polls += 1
        return routing_stats(self._engine.stats(), self._device).to_dict()

    def check_health(self) -> None:
        self._engine.check_health()

    def __del__(self):
        task = getattr(self, "_metrics_task", None)
        if task is not None:
            task.cancel()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()

    # -- requests ---------------------------------------------------------------------------------
    async def generate(self, batch: PromptBatch, *, routing_hint: Any = None) -> BatchResult:
        return await self._runner.collect(batch)

    async def stream(self, batch: PromptBatch, *, routing_hint: Any = None
                     ) -> AsyncIterator[list[StreamChunk]]:
        async with aclosing(self._runner.run(batch, paced=True)) as stream:
            async for chunks in stream:
                yield chunks

    def counters(self) -> dict[str, Any]:
        """What this replica did: for tests and debugging (`handle.broadcast("counters")`)."""
        s = self._engine.stats()
        return {"replica": self._replica, "rank": self._rank, "gpu_ids": _gpu_ids(), "device": self._device,
                "pid": os.getpid(), "routing_stats_polls": self._routing_stats_polls,
                "captured_buckets": list(s.captured_buckets), "max_num_seqs": s.max_num_seqs,
                "batch_sizes": dict(self._runner.batch_sizes),
                "decode_steps": [[b, path, n] for (b, path), n in sorted(s.decode_steps.items())],
                "mixed_steps": s.mixed_steps, "mixed_graph_steps": s.mixed_graph_steps,
                "preemptions": s.preemptions,
                "prefix_hit_tokens": s.prefix_hit_tokens, "prefix_queried_tokens": s.prefix_queried_tokens,
                "free_blocks": s.free_blocks, "total_blocks": s.total_blocks,
                "padded_rows": {str(b): n for b, n in sorted(s.padded_rows.items())},
                "generated_tokens": s.generated_tokens, "prompt_tokens": s.prompt_tokens,
                "running": s.running, "queued": s.queued, "finished_requests": s.finished_requests,
                "aborted_requests": s.aborted_requests, "admitted_sequences": self._runner.admitted,
                "refused_batches": self._runner.refused_batches,
                "ttft_ms_counts": list(self._runner.ttft.counts),
                "tpot_ms_counts": list(self._runner.tpot.counts),
                "arrival_ms_counts": list(self._runner.arrival.counts),
                "routing_stats": routing_stats(s, self._device).to_dict()}   # what the router reads

    async def _export_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_PERIOD_S)
            try:
                self._metrics.update(self._engine.stats())
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                log.warning("LLMReplica: metrics update failed", exc_info=True)
