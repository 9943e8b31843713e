"""Per-bucket decode graphs over static buffers: capture once at startup, replay every step.

Static inputs are sized for the largest row count R (largest bucket, or max_num_seqs if larger) and
never reallocated; bucket b's graph reads rows [:b]. A step with n live rows picks the smallest
bucket >= n, writes the n rows, and fills rows n..b-1 with padding that points at the KV pool's
scratch slot (position 0, length 1, greedy), so padding cannot touch a real sequence.

Steps overlap with the host: `launch` queues a step and the copy of its tokens to pinned memory
and returns; `collect` waits for them. A row may take its input token straight from the previous
step's output on the device (`src`), so step k+1 is launched before the host has read step k.

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


class InFlight:
    """A launched decode step: its n tokens arrive in a pinned host buffer once `event` fires."""
    __slots__ = ("result", "n", "host_out", "event")

    def __init__(self, result: StepResult, n: int, host_out: torch.Tensor, event):
        self.result, self.n, self.host_out, self.event = result, n, host_out, event


class DecodeGraphs:
    MODES = ("greedy", "sample")
    INT_FIELDS = 8   # tokens, positions, slot_ids, seq_lens, top_k, seeds, steps, src

    def __init__(self, model, kv, buckets: tuple[int, ...], max_rows: int, use_graphs: bool):
        self.model, self.kv, self.buckets = model, kv, tuple(buckets)
        dev = model.device
        self.rows = R = max(max_rows, self.buckets[-1])
        self.use_graphs = use_graphs and dev.type == "cuda"
        # One int64 and one float32 block so a step's inputs cross to the device in two copies.
        self._ints = torch.zeros(self.INT_FIELDS, R, dtype=torch.long, device=dev)
        (self.tokens, self.positions, self.slot_ids, self.seq_lens,
         self.top_k, self.seeds, self.steps, self.src) = self._ints.unbind(0)
        self._floats = torch.zeros(2, R, dtype=torch.float32, device=dev)
        self.temperature, self.top_p = self._floats.unbind(0)
        self.logits = torch.zeros(R, model.shape.vocab_size, dtype=model.dtype, device=dev)
        self.out_tokens = torch.zeros(R, dtype=torch.long, device=dev)
        # Host-side buffers come in pairs: step k fills one while step k-1's copies may still be
        # queued on the device reading (inputs) or writing (tokens) the other.
        pin = dev.type == "cuda"
        self._host_ints = [torch.zeros(self.INT_FIELDS, R, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._host_floats = [torch.zeros(2, R, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self._host_out = [torch.zeros(R, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if dev.type == "cuda" else [None, None]
        self._flip = 0
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self.warmup_seconds = 0.0
        self.graph_bytes = 0
        self._capture_closed = False

    # -- the hot path ---------------------------------------------------------------------------
    def _step(self, b: int, mode: str) -> None:
        """Decode rows [:b] of the static buffers; the captured region. Tokens land in out_tokens.
        A row with src >= 0 feeds the token the previous step produced in row src (still on the
        device, not yet read by the host); src < 0 feeds tokens[row]."""
        src = self.src[:b]
        tokens = torch.where(src >= 0, self.out_tokens[src.clamp(min=0)], self.tokens[:b])
        logits = self.logits[:b]
        self.model.decode(tokens, self.positions[:b], self.slot_ids[:b], self.seq_lens[:b], self.kv, logits)
        if mode == "greedy":
            tok = greedy(logits)
        else:
            tok = sample(logits, self.temperature[:b], self.top_k[:b], self.top_p[:b],
                         self.seeds[:b], self.steps[:b])
        self.out_tokens[:b].copy_(tok)

    def bucket_for(self, n: int) -> int:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else 0

    def launch(self, rows: list[tuple], sampling: bool) -> InFlight:
        """rows: (token, position, slot, top_k, seed, step, temperature, top_p, src) per live
        sequence. Queues the step and the copy of its tokens to the host, and returns at once."""
        n = len(rows)
        b = self.bucket_for(n)
        width = b or n
        f = self._flip
        hi, hf, host_out, event = self._host_ints[f], self._host_floats[f], self._host_out[f], self._events[f]
        self._flip ^= 1
        self._fill_host(hi, hf, rows, width)
        self._ints[:, :width].copy_(hi[:, :width], non_blocking=True)
        self._floats[:, :width].copy_(hf[:, :width], non_blocking=True)
        mode = "sample" if sampling else "greedy"
        graph = self.graphs.get((b, mode))
        if graph is not None:
            graph.replay()
            result = StepResult(b, "graph", b - n)
        else:
            self._step(width, mode)
            result = StepResult(b, "eager", width - n)
        host_out[:n].copy_(self.out_tokens[:n], non_blocking=True)
        if event is not None:
            event.record()
        return InFlight(result, n, host_out, event)

    @staticmethod
    def collect(step: InFlight) -> list[int]:
        """The step's tokens; the one host wait of a decode step."""
        if step.event is not None:
            step.event.synchronize()
        return step.host_out[:step.n].tolist()

    def _fill_host(self, hi: torch.Tensor, hf: torch.Tensor, rows: list[tuple], width: int) -> None:
        n = len(rows)
        if n:
            tok, pos, slot, top_k, seed, step, temp, top_p, src = zip(*rows)
            hi[0, :n] = torch.tensor(tok)
            hi[1, :n] = torch.tensor(pos)
            hi[2, :n] = torch.tensor(slot)
            hi[3, :n] = hi[1, :n] + 1                       # attend to everything up to and incl. pos
            hi[4, :n] = torch.tensor(top_k)
            hi[5, :n] = torch.tensor(seed)
            hi[6, :n] = torch.tensor(step)
            hi[7, :n] = torch.tensor(src)
            hf[0, :n] = torch.tensor(temp)
            hf[1, :n] = torch.tensor(top_p)
        if width > n:  # padding rows: scratch slot, position 0, length 1, greedy, own token
            hi[:, n:width] = 0
            hi[2, n:width] = self.kv.scratch_slot
            hi[3, n:width] = 1
            hi[7, n:width] = -1
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
        hi, hf = self._host_ints[0], self._host_floats[0]
        self._fill_host(hi, hf, [], self.rows)  # every row padding: valid inputs for warm-up and capture
        self._ints.copy_(hi)
        self._floats.copy_(hf)
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
