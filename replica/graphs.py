"""Per-bucket decode graphs over static buffers: capture once at startup, replay every decode step.

Static inputs are sized for R rows (the largest bucket, or max_num_seqs if larger) and never
reallocated; bucket b's graph reads rows [:b]. A decode step with n live rows picks the smallest
bucket >= n, writes the n rows, and fills rows n..b-1 with padding that points at the scratch
block-table row, the scratch KV block and the scratch sampling row (position 0, greedy), so
padding can never touch a real sequence.

`DecodeStep.run(b, mode)` is the captured region - the engine's hot path:

    tokens = where(src >= 0, out.tokens[src], tokens)     # inputs still on the device
    block_tables[rows, pos // bs] = slots // bs            # the block of every fed token
    logits = model.decode(tokens, pos, slots, rows)        # paged attention over block tables
    out = greedy(logits) | tables.full(logits, rows, steps)

A bucket whose measured step is slower than a larger bucket's hands its batches to that one
(`prefer_faster`, fed by the engine's measured step times).

Two graphs per bucket: "greedy" (argmax only; every row plain greedy) and "full" (bias, penalties,
temperature/top-k/top-p/min-p, logprobs). Capture runs largest bucket first into one shared memory
pool with Python's gc frozen; after `capture_all` returns, a second call raises (no capture at
request time). On CPU, or with graphs disabled, the same region runs eagerly (still padded).
"""
from __future__ import annotations

import bisect
import gc
import time
from typing import Callable, Optional

import torch

from replica.batch import COLUMNS
from replica.sampling import SampleOutput, SamplingTables, greedy
from replica.sampling_params import MAX_LOGPROBS

MODES = ("greedy", "full")
# Warm-up runs the first layers only (LlamaModel.first_layers): layer 2 onward repeats layer 1's
# kernels at its shapes. 8B on H200: 37 warm-up forwards took 0.46 s over 32 layers.
WARMUP_LAYERS = 2
FASTER_REL, FASTER_ABS_S = 0.05, 0.5e-3   # prefer_faster: what a larger bucket must save per step


class CaptureClosedError(RuntimeError):
    """A CUDA graph capture was attempted after engine startup."""


class StepOutputs:
    """Device output buffers shared by graph replays and eager mixed steps (the next step's
    `src` reads `tokens`)."""

    def __init__(self, rows: int, device: torch.device):
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.logprob = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_ids = torch.zeros(rows, MAX_LOGPROBS, dtype=torch.long, device=device)
        self.top_logprobs = torch.zeros(rows, MAX_LOGPROBS, dtype=torch.float32, device=device)

    def view(self, n: int) -> SampleOutput:
        return SampleOutput(self.tokens[:n], self.logprob[:n], self.top_ids[:n], self.top_logprobs[:n])


class DecodeStep:
    def __init__(self, model, kv, tables: SamplingTables, out: StepOutputs, rows: int):
        self.model, self.kv, self.tables, self.out = model, kv, tables, out
        self.rows = rows
        dev = model.device
        self.inputs = torch.zeros(len(COLUMNS), rows, dtype=torch.long, device=dev)
        (self.tokens, self.src, self.positions, self.table_rows, self.slots,
         self.steps) = self.inputs.unbind(0)
        self.logits = torch.zeros(rows, model.shape.vocab_size, dtype=model.dtype, device=dev)

    def run(self, b: int, mode: str) -> None:
        """Decode rows [:b] of the static buffers; the captured region."""
        src = self.src[:b]
        tokens = torch.where(src >= 0, self.out.tokens[src.clamp(min=0)], self.tokens[:b])
        pos, rows, slots = self.positions[:b], self.table_rows[:b], self.slots[:b]
        self.kv.write_table(rows, pos, slots)
        logits = self.logits[:b]
        self.model.decode(tokens, pos, slots, rows, self.kv, logits)
        if mode == "greedy":
            self.out.tokens[:b].copy_(greedy(logits))
        else:
            self.tables.full(logits, rows, self.steps[:b], self.out.view(b))

    def padding(self) -> list[int]:
        """One padding row's input columns (same order as COLUMNS)."""
        return [0, -1, 0, self.kv.scratch_row, 0, 0]


class DecodeGraphs:
    def __init__(self, step: DecodeStep, buckets: tuple[int, ...], use_graphs: bool):
        self.step, self.buckets = step, tuple(buckets)
        self.use_graphs = use_graphs and step.model.device.type == "cuda"
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.capture_seconds = self.warmup_seconds = 0.0
        self.graph_bytes = 0
        self._closed = False
        self.faster: dict[int, int] = {}   # bucket -> a larger bucket measured faster (prefer_faster)

    def bucket_for(self, n: int) -> Optional[int]:
        i = bisect.bisect_left(self.buckets, n)
        if i == len(self.buckets):
            return None
        return self.faster.get(self.buckets[i], self.buckets[i])

    def prefer_faster(self, step_s: dict[int, float]) -> None:
        """Send a bucket's batches to a larger captured bucket whose measured step is shorter by
        at least FASTER_REL and FASTER_ABS_S (then the padding rows cost less than the shape).
        `step_s`: bucket -> measured step seconds, 0 or absent when not measured. Why: cuBLAS picks
        a slow kernel for some row counts - llama-8b's w13 GEMM at 448 rows takes 0.27 ms against
        0.16 ms at 512 on H200, so the 448-row step is ~2 ms slower than the 512-row one
        (benchmarks/decode_shapes.py) - while llama-1b's is not. The absolute floor keeps host
        timing jitter on sub-millisecond steps from moving small batches. Graphs only: on CPU the
        times are the host's, and the bucket a batch runs at stays the smallest that holds it."""
        if not self.use_graphs:
            return
        faster: dict[int, int] = {}
        best, best_s = 0, float("inf")        # the fastest measured bucket larger than b
        for b in reversed(self.buckets):
            t = step_s.get(b) or 0.0
            if not t:
                continue
            if best and t - best_s >= max(FASTER_REL * t, FASTER_ABS_S):
                faster[b] = best
            elif t < best_s:
                best, best_s = b, t
        self.faster = faster

    def replay(self, b: int, mode: str) -> bool:
        """Run bucket b: replay its graph (True) or run it eagerly (False: no graph for it)."""
        graph = self.graphs.get((b, mode))
        if graph is None:
            self.step.run(b, mode)
            return False
        graph.replay()
        return True

    @property
    def captured_buckets(self) -> tuple[int, ...]:
        return tuple(sorted({b for b, _ in self.graphs}))

    def capture_all(self, fill_padding: Callable[[int], None], log=print,
                    also: Optional[Callable[[object, torch.cuda.Stream], None]] = None) -> None:
        """Warm up and capture every (bucket, mode), largest bucket first, into one memory pool.
        `fill_padding(rows)` makes every static row valid padding before warm-up and capture.
        `also(pool, stream)` captures further graphs into the same pool in the same window (the
        mixed-step graphs): counted in capture_seconds and graph_bytes, and closed with these."""
        if self._closed:
            raise CaptureClosedError("CUDA graphs are captured once, at engine startup; "
                                     "a capture after startup is refused")
        self._closed = True
        if not self.use_graphs:
            return
        fill_padding(self.step.rows)
        # One side stream for warm-up and capture: its cuBLAS workspace is allocated once, in the
        # warm-up, outside the graphs' pool (a fresh stream per capture would pay one per graph).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        t0 = time.perf_counter()
        with torch.cuda.stream(side), self.step.model.first_layers(WARMUP_LAYERS):
            for b, mode in self._warmup_runs():   # compile first (Triton JIT, cuBLAS): capture is capture
                self.step.run(b, mode)
        torch.cuda.synchronize()
        # The caching allocator keeps blocks per stream: what the warm-up freed on the side stream
        # would stay reserved and unusable by the eager (default-stream) steps. Return it, so that
        # graph_bytes below counts the graphs' pool alone.
        torch.cuda.empty_cache()
        self.warmup_seconds = time.perf_counter() - t0
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        gc.collect()
        gc.freeze()  # a gc pass during capture is slow and can free tensors the graph still uses
        try:
            with torch.cuda.stream(side):
                for b in reversed(self.buckets):      # largest first: the pool grows once
                    for mode in MODES:
                        self.graphs[(b, mode)] = self._capture_one(b, mode, pool)
            if also is not None:
                also(pool, side)
        finally:
            gc.unfreeze()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        self.graph_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])
        log(f"captured {len(self.graphs)} CUDA graphs for buckets {list(self.buckets)}: warm-up/JIT "
            f"{self.warmup_seconds:.2f} s, capture {self.capture_seconds:.2f} s, "
            f"{self.graph_bytes / 2**20:.1f} MiB")

    def _warmup_runs(self) -> list[tuple[int, str]]:
        """(bucket, mode) runs that compile every kernel the captures will launch: the model and
        the full sampler at every bucket (Triton specializes on row counts), greedy once, at the
        largest bucket: its model half is the full mode's and its argmax compiles nothing (17
        fewer 8B forwards at startup, ~0.35 s on H200)."""
        largest = self.buckets[-1]
        return [(largest, "greedy")] + [(b, "full") for b in reversed(self.buckets)]

    def _capture_one(self, b: int, mode: str, pool) -> torch.cuda.CUDAGraph:
        """Capture on the current (side) stream, already warm. capture_begin/end directly rather
        than `torch.cuda.graph`, whose __enter__ syncs and empties both allocator caches per graph."""
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=pool)
        try:
            self.step.run(b, mode)
        finally:
            graph.capture_end()
        return graph
