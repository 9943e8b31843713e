"""Per-bucket decode graphs over static buffers: capture once at startup, replay every step.

Static inputs are sized for the largest row count R (largest bucket, or max_num_seqs if larger) and
never reallocated; bucket b's graph reads rows [:b]. A step with n live rows picks the smallest
bucket >= n, writes the n rows, and fills rows n..b-1 with padding that points at the KV pool's
scratch slot (position 0, length 1, greedy), so padding cannot touch a real sequence.

Two graphs per bucket: "greedy" (argmax only) and "sample" (the full sampler); a step uses the
greedy graph when no row samples. Capture runs largest bucket first into one shared memory pool with
Python's gc frozen; after `capture_all` returns, `capture_all` raises (no capture at request time).
On CPU, or with graphs disabled, the same `_step` runs eagerly (still padded to a bucket).
"""
from __future__ import annotations

import bisect
import gc
import time
from dataclasses import dataclass

import torch

from replica.sampling import greedy, sample


class CaptureClosedError(RuntimeError):
    """A CUDA graph capture was attempted after engine startup."""


@dataclass(frozen=True)
class StepResult:
    bucket: int     # rows run (>= n); 0 when no bucket fits and the step ran eagerly at n rows
    path: str       # "graph" | "eager"
    padded: int     # padding rows run


class DecodeGraphs:
    MODES = ("greedy", "sample")

    def __init__(self, model, kv, buckets: tuple[int, ...], max_rows: int, use_graphs: bool):
        self.model, self.kv, self.buckets = model, kv, tuple(buckets)
        dev = model.device
        self.rows = R = max(max_rows, self.buckets[-1])
        self.use_graphs = use_graphs and dev.type == "cuda"
        # One int64 and one float32 block so a step's inputs cross to the device in two copies.
        self._ints = torch.zeros(7, R, dtype=torch.long, device=dev)
        (self.tokens, self.positions, self.slot_ids, self.seq_lens,
         self.top_k, self.seeds, self.steps) = self._ints.unbind(0)
        self._floats = torch.zeros(2, R, dtype=torch.float32, device=dev)
        self.temperature, self.top_p = self._floats.unbind(0)
        self.logits = torch.zeros(R, model.shape.vocab_size, dtype=model.dtype, device=dev)
        self.out_tokens = torch.zeros(R, dtype=torch.long, device=dev)
        pin = dev.type == "cuda"
        self._host_ints = torch.zeros(7, R, dtype=torch.long, pin_memory=pin)
        self._host_floats = torch.zeros(2, R, dtype=torch.float32, pin_memory=pin)
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self.warmup_seconds = 0.0
        self.graph_bytes = 0
        self._capture_closed = False

    # -- the hot path ---------------------------------------------------------------------------
    def _step(self, b: int, mode: str) -> None:
        """Decode rows [:b] of the static buffers; the captured region. Tokens land in out_tokens."""
        logits = self.logits[:b]
        self.model.decode(self.tokens[:b], self.positions[:b], self.slot_ids[:b], self.seq_lens[:b],
                          self.kv, logits)
        if mode == "greedy":
            tok = greedy(logits)
        else:
            tok = sample(logits, self.temperature[:b], self.top_k[:b], self.top_p[:b],
                         self.seeds[:b], self.steps[:b])
        self.out_tokens[:b].copy_(tok)

    def bucket_for(self, n: int) -> int:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else 0

    def run(self, rows: list[tuple], sampling: bool) -> StepResult:
        """rows: (token, position, slot, top_k, seed, step, temperature, top_p) per live sequence.
        Launches the step without waiting; read `out_tokens[:len(rows)]` afterwards (one sync)."""
        n = len(rows)
        b = self.bucket_for(n)
        width = b or n
        self._fill_host(rows, width)
        self._ints[:, :width].copy_(self._host_ints[:, :width], non_blocking=True)
        self._floats[:, :width].copy_(self._host_floats[:, :width], non_blocking=True)
        mode = "sample" if sampling else "greedy"
        graph = self.graphs.get((b, mode))
        if graph is not None:
            graph.replay()
            return StepResult(b, "graph", b - n)
        self._step(width, mode)
        return StepResult(b, "eager", width - n)

    def _fill_host(self, rows: list[tuple], width: int) -> None:
        hi, hf = self._host_ints, self._host_floats
        n = len(rows)
        if n:
            tok, pos, slot, top_k, seed, step, temp, top_p = zip(*rows)
            hi[0, :n] = torch.tensor(tok)
            hi[1, :n] = torch.tensor(pos)
            hi[2, :n] = torch.tensor(slot)
            hi[3, :n] = hi[1, :n] + 1                       # attend to everything up to and incl. pos
            hi[4, :n] = torch.tensor(top_k)
            hi[5, :n] = torch.tensor(seed)
            hi[6, :n] = torch.tensor(step)
            hf[0, :n] = torch.tensor(temp)
            hf[1, :n] = torch.tensor(top_p)
        if width > n:  # padding rows: scratch slot, position 0, length 1, greedy
            hi[:, n:width] = 0
            hi[2, n:width] = self.kv.scratch_slot
            hi[3, n:width] = 1
            hf[:, n:width] = 1.0
            hf[0, n:width] = 0.0

    # -- startup --------------------------------------------------------------------------------
    def capture_all(self, log=print) -> None:
        """Warm up and capture every (bucket, mode), largest bucket first, into one memory pool."""
        if self._capture_closed:
            raise CaptureClosedError("CUDA graphs are captured once, at engine startup; "
                                     "a capture after startup is refused")
        self._capture_closed = True
        if not self.use_graphs:
            return
        self._fill_host([], self.rows)  # every row padding: valid inputs for warm-up and capture
        self._ints.copy_(self._host_ints)
        self._floats.copy_(self._host_floats)
        # Compile first (Triton JIT, cuBLAS handles, allocator warm-up) so capture time is capture.
        t0 = time.perf_counter()
        for b in reversed(self.buckets):
            for mode in self.MODES:
                self._step(b, mode)
        torch.cuda.synchronize()
        self.warmup_seconds = time.perf_counter() - t0
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        gc.collect()
        gc.freeze()  # a gc pass during capture is slow and can free tensors the graph still uses
        try:
            for b in reversed(self.buckets):
                for mode in self.MODES:
                    self.graphs[(b, mode)] = self._capture_one(b, mode, pool)
        finally:
            gc.unfreeze()
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        self.graph_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])
        log(f"captured {len(self.graphs)} CUDA graphs for buckets {list(self.buckets)}: warm-up/JIT "
            f"{self.warmup_seconds:.2f} s, capture {self.capture_seconds:.2f} s, "
            f"{self.graph_bytes / 2**20:.1f} MiB")

    def _capture_one(self, b: int, mode: str, pool) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(b, mode)  # one run on the capture stream so its allocations are pooled
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._step(b, mode)
        return graph

    @property
    def captured_buckets(self) -> tuple[int, ...]:
        return tuple(sorted({b for b, _ in self.graphs}))

    def input_addresses(self) -> list[int]:
        return [self._ints.data_ptr(), self._floats.data_ptr(), self.logits.data_ptr(),
                self.out_tokens.data_ptr()]
