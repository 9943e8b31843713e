"""ModelRunner: owns the tensors of one engine - weights, paged KV cache, sampling tables, decode
graphs - builds them at startup, and runs the scheduler's `StepBatch`es.

Startup (each phase timed in `StartupReport`): load weights -> size memory (replica/sizing.py:
probe activation at the planned rows, then KV blocks) -> allocate the KV cache -> capture every
bucket's decode graphs (replica/graphs.py) -> close capture.

A step: `launch(batch)` queues it on the GPU and returns an `InFlight` at once - a pure-decode
batch replays its bucket's graph, a batch with prefill chunks runs one eager mixed forward - with
the copy of its sampled tokens (and logprobs when asked) to pinned host memory behind it;
`collect(inflight)` waits for that copy: the step's one host wait. Every host -> device input
goes through pinned memory without blocking, so launching step k+1 never waits for step k.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from replica import kernels as K
from replica import sizing
from replica.batch import COLUMNS, StepBatch
from replica.config import ConfigError, EngineConfig
from replica.graphs import DecodeGraphs, DecodeStep, StepOutputs
from replica.kv_cache import PagedKVCache
from replica.loader import load_model, resolve_dtype
from replica.mixed_graphs import MixedGraphs
from replica.sampling import SamplingTables, greedy
from replica.sampling_params import MAX_LOGPROBS, TokenLogprob
from replica.stats import StartupReport

log = logging.getLogger("replica")

# An eager mixed step runs its matmuls at a padded row count (`eager_rows`; padding rows are token
# 0 at position 0, which attention skips). cuBLAS chooses a GEMM algorithm per shape and remembers
# it: a row count it has not seen costs ~110 us more host time per GEMM call (H200 host, 31 vs 141
# us median, results/step_profile-*.json), and its first call may load a kernel, which waits for
# the whole queue (20-30 ms mid-burst). A mixed step's token count is new almost every step, so
# rows are padded to a multiple of 16 up to 2048 tokens (8 rows of GPU work on average) and of 128
# above (under 6.3%), and every padded count a step can reach runs once at startup
# (`_warm_eager_shapes`: 178 counts for llama-1b's 16k-token budget, ~0.3 s on an H200).
EAGER_MIXED_ROWS = 16
EAGER_COARSE_ROWS, EAGER_COARSE_FROM = 128, 2048
# A mixed step's logits are computed for its sampled rows padded to a multiple of this, and the
# lm_head GEMM runs once at every such count at startup, for the same reason.
LOGIT_ROWS = 64


def eager_rows(tokens: int) -> int:
    """The row count an eager mixed step of `tokens` tokens runs its matmuls at."""
    step = EAGER_MIXED_ROWS if tokens <= EAGER_COARSE_FROM else EAGER_COARSE_ROWS
    return -(-tokens // step) * step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device='cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@dataclass
class InFlight:
    """A launched step: `n` sampled rows whose outputs arrive in pinned host buffers at `event`."""
    n: int
    kind: str                      # "graph" | "eager" (pure decode) | "mixed"
    bucket: int                    # decode bucket run; mixed: the graphs' padded size, 0 if eager
    host: "HostBuffers"
    logprobs: bool
    event: Optional[torch.cuda.Event]   # None on CPU, where `launch` ran the step to completion
    started_at: float = 0.0             # perf_counter() when `launch` began
    launched_at: float = 0.0            # ... and when it returned


class HostBuffers:
    """Pinned host memory for one step's decode inputs and sampled outputs (two sets, alternated:
    step k+1 fills one while step k's copies may still use the other)."""

    def __init__(self, rows: int, pin: bool):
        self.inputs = torch.zeros(len(COLUMNS), rows, dtype=torch.long, pin_memory=pin)
        self.tokens = torch.zeros(rows, dtype=torch.long, pin_memory=pin)
        self.logprob = torch.zeros(rows, dtype=torch.float32, pin_memory=pin)
        self.top_ids = torch.zeros(rows, MAX_LOGPROBS, dtype=torch.long, pin_memory=pin)
        self.top_logprobs = torch.zeros(rows, MAX_LOGPROBS, dtype=torch.float32, pin_memory=pin)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = c = config
        self.device = resolve_device(c.device)
        compile_key = K.prefetch_compile_key() if self.device.type == "cuda" else None
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.empty(1, device=self.device)          # creates the context here, timed
        init_s = time.perf_counter() - t0
        self.dtype = resolve_dtype(c.dtype, self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model, self.hf_config = load_model(c.model, c.max_seq_len, self.device, self.dtype, c.seed)
        self._sync()
        load_s = time.perf_counter() - t0
        s = self.model.shape
        self.vocab_size = s.vocab_size
        self.tile_tokens = K.prefill_tile_tokens(self.dtype, s.head_dim, s.num_heads // s.num_kv_heads)
        log.info("loaded %s: %.2f GiB of weights in %.2f s on %s", c.model,
                 self.model.weight_bytes() / 2**30, load_s, self.device)
        self.step_token_budget = sizing.step_budget(c, s.matmul_params, self.device.type == "cuda")
        self.mixed_tokens = sizing.mixed_graph_tokens(c, s.matmul_params, s.num_layers,
                                                      self.device.type == "cuda" and c.use_cuda_graphs)
        log.info("step token budget: %d tokens%s", self.step_token_budget,
                 "" if c.step_token_budget else f" (sized for {s.matmul_params / 1e9:.2f}B matmul weights)")
        t0 = time.perf_counter()
        if compile_key is not None:
            compile_key.join()                 # before the first kernel launch: computed once
        self.compile_ahead_seconds = 0.0       # set by the probe on CUDA
        bpb = PagedKVCache.bytes_per_block(s.num_layers, s.num_kv_heads, c.block_size, s.head_dim, self.dtype)
        with torch.inference_mode():
            plan, table_rows = self._plan(bpb)
        self.plan, self.rows = plan, plan.rows
        self.kv = PagedKVCache(plan.num_blocks, c.block_size, s.num_layers, s.num_kv_heads, s.head_dim,
                               table_rows, c.max_seq_len, self.dtype, self.device)
        self.decode = DecodeStep(self.model, self.kv, self.tables, self.out, self.out.tokens.shape[0])
        self.graphs = DecodeGraphs(self.decode, plan.buckets, c.use_cuda_graphs)
        self.mixed = MixedGraphs(self.model, self.kv, self.mixed_tokens)
        size_s = time.perf_counter() - t0
        with torch.inference_mode():
            self.graphs.capture_all(self._fill_padding, log=log.info, also=self.mixed.capture)
            eager_warmup_s = self._warm_eager_shapes()
        if self.mixed.graphs:
            log.info("mixed steps of up to %d tokens replay piecewise graphs (sizes %s, %.2f s)",
                     self.mixed.sizes[-1], list(self.mixed.sizes), self.mixed.capture_seconds)
        pin = self.device.type == "cuda"
        self._host = [HostBuffers(self.decode.rows, pin) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if pin else [None, None]
        self._flip = itertools.cycle((0, 1))
        # fallback="queue" never decodes more rows than the largest bucket
        self.max_decode_rows = plan.buckets[-1] if c.fallback == "queue" else plan.rows
        self.startup = StartupReport(
            weights_bytes=self.model.weight_bytes(), kv_cache_bytes=self.kv.nbytes,
            graph_bytes=self.graphs.graph_bytes, graph_bytes_estimate=plan.activation_bytes,
            device_init_seconds=init_s, load_seconds=load_s, sizing_seconds=size_s,
            compile_seconds=self.compile_ahead_seconds,
            warmup_seconds=self.graphs.warmup_seconds + eager_warmup_s,
            capture_seconds=self.graphs.capture_seconds)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- startup --------------------------------------------------------------------------------
    def _plan(self, bytes_per_block: int) -> tuple[sizing.MemoryPlan, int]:
        """The memory plan; also allocates the sampling tables and output buffers (sized at the
        probed rows). Returns (plan, table rows)."""
        c = self.config
        if self.device.type != "cuda":
            plan = sizing.plan_cpu(c, bytes_per_block)
            self._alloc_row_state(max(plan.rows, plan.buckets[-1]))
            return plan, plan.rows
        free, total = torch.cuda.mem_get_info(self.device)
        per_token = bytes_per_block // c.block_size
        budget0 = sizing.share_left(c, total, free, self._own_bytes())
        rows = sizing.rows_guess(c, budget0, per_token)
        width = max(rows, c.batch_buckets[-1] if c.batch_buckets else 0)
        self._alloc_row_state(width)
        activation = self._probe_activation(width) + MixedGraphs.static_bytes(
            self.model.shape, self.mixed_tokens, self.model.embed.element_size())
        torch.cuda.empty_cache()             # the probe's buffers are gone: let mem_get_info see it
        free, total = torch.cuda.mem_get_info(self.device)
        plan = sizing.plan_cuda(c, total, free, self._own_bytes(), activation, bytes_per_block, rows)
        return plan, rows

    def _own_bytes(self) -> int:
        """What this process's allocator holds: per process, so engines that start together on
        one GPU do not count each other's weights (free memory would)."""
        return torch.cuda.memory_reserved(self.device)

    def _alloc_row_state(self, width: int) -> None:
        self.tables = SamplingTables(width, self.vocab_size, self.device)
        self.out = StepOutputs(width, self.device)

    def _probe_activation(self, width: int) -> int:
        """Peak memory of a full-mode decode step at `width` rows and a mixed forward of the token
        budget, against a two-block cache (every row padding). Over the first two layers: a
        layer's temporaries are freed before the next one's, so more layers add launches and
        FLOPs (the step budget is ~40 TFLOP through the whole stack), not peak."""
        c, s = self.config, self.model.shape
        probe_kv = PagedKVCache(2, c.block_size, s.num_layers, s.num_kv_heads, s.head_dim, width,
                                c.max_seq_len, self.dtype, self.device)
        step = DecodeStep(self.model, probe_kv, self.tables, self.out, width)
        self.decode, self.kv = step, probe_kv
        self._fill_padding(width)

        def run():
            step.run(width, "full")
            self._mixed_probe(probe_kv)

        def prefill_first():
            self._mixed_probe(probe_kv)
            step.run(width, "full")
        with self.model.first_layers(2):
            # The probe's launches are the engine's first: compile its kernels in parallel (a
            # fresh machine compiled them one by one here, ~4 s for llama-8b), then measure. The
            # prefill kernels take longest (1.0-1.2 s each), so their compiles start first.
            self.compile_ahead_seconds = K.compile_ahead(prefill_first)
            peak = sizing.measure_peak(run, self.device)
        del self.decode, self.kv
        return peak

    def eager_gemms(self) -> list[tuple[str, torch.Tensor, Optional[torch.Tensor], int]]:
        """(name, weight, bias, rows) of every GEMM shape an eager mixed step can launch: the
        lm_head at every padded logit-row count (LOGIT_ROWS up to a row per sequence), and layer 0's
        four matmuls (every layer has the same shapes) at every `eager_rows` count from the first
        token count past the mixed graphs to the most a step can hold."""
        m, L = self.model, self.model.layers[0]
        logit_counts = range(LOGIT_ROWS, self.rows + LOGIT_ROWS, LOGIT_ROWS)
        calls = [("lm_head", m.lm_head, None, rows) for rows in logit_counts]
        first = (self.mixed.sizes[-1] if self.mixed.graphs else 0) + 1
        most_tokens = self.step_token_budget + self.rows       # a bound: decode rows + the budget
        for rows in sorted({eager_rows(n) for n in range(first, most_tokens + 1)}):
            calls += [("wqkv", L.wqkv, L.bqkv, rows), ("wo", L.wo, None, rows), ("w13", L.w13, None, rows),
                      ("w2", L.w2, None, rows)]
        return calls

    def gemm_inputs(self, calls) -> dict[int, torch.Tensor]:
        """A zero input per inner dimension of `calls`, as many rows as the largest needs."""
        most = max(rows for *_, rows in calls)
        return {k: torch.zeros(most, k, dtype=self.dtype, device=self.device)
                for k in {w.shape[1] for _, w, *_ in calls}}

    def _warm_eager_shapes(self) -> float:
        """Each of `eager_gemms` once, so that no step loads a cuBLAS kernel mid-run. Seconds."""
        if self.device.type != "cuda":
            return 0.0
        t0 = time.perf_counter()
        calls = self.eager_gemms()
        inputs = self.gemm_inputs(calls)
        for _, w, bias, rows in calls:
            F.linear(inputs[w.shape[1]][:rows], w, bias)
        self._sync()
        return time.perf_counter() - t0

    def _mixed_probe(self, kv: PagedKVCache) -> torch.Tensor:
        """A mixed step as the server runs them, on the scratch row of `kv`: one decode row
        (compiles the prefill kernel's decode-tile variant at startup, not mid-burst) and prompt
        chunks filling the token budget, none longer than a sequence can be (the budget may
        exceed max_seq_len). Returns the logits of each chunk's last row."""
        longest, budget, dev = self.config.max_seq_len - 1, self.step_token_budget, self.device
        chunks = [min(longest, budget - i) for i in range(0, budget, longest)]
        zeros = torch.zeros(1 + budget, dtype=torch.long, device=dev)
        positions = torch.cat([torch.tensor([chunks[0]], device=dev)] + [torch.arange(k, device=dev) for k in chunks])
        meta = K.PrefillMeta.build([1] + chunks, [chunks[0] + 1] + chunks, [kv.scratch_row] * (1 + len(chunks)), dev,
                                   tile_tokens=self.tile_tokens)
        last_rows = torch.tensor(list(itertools.accumulate([1] + chunks)), device=dev) - 1
        return self.model.forward_mixed(zeros, positions, zeros, meta, kv, last_rows)

    def _fill_padding(self, width: int) -> None:
        pad = torch.tensor(self.decode.padding(), dtype=torch.long, device=self.device)
        self.decode.inputs[:, :width] = pad[:, None]

    # -- a step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: StepBatch) -> InFlight:
        started_at = time.perf_counter()
        if batch.admitted:
            a = batch.admitted
            self.tables.write([s.row for s in a], [s.params for s in a], [s.seed for s in a],
                              [s.prompt_ids for s in a], [s.output_ids for s in a], [s.stop_ids for s in a])
        if batch.table_writes:
            r, col, blk = (self._to_device(list(x)) for x in zip(*batch.table_writes))
            self.kv.block_tables[r, col] = blk.to(torch.int32)
        host = self._host[next(self._flip)]
        if batch.mixed:   # bucket: the piecewise graphs' padded size, 0 when eager
            kind, bucket = "mixed", self._run_mixed(batch, batch.greedy)
        else:
            kind, bucket = self._run_decode(batch, host, "greedy" if batch.greedy else "full")
        return self._copy_out(batch.num_sampled, kind, bucket, host, batch.logprobs, started_at)

    def _run_decode(self, batch: StepBatch, host: HostBuffers, mode: str) -> tuple[str, int]:
        d = batch.decode
        n = len(d)
        b = self.graphs.bucket_for(n) or n           # past the largest bucket: eager at n rows
        host.inputs[:, :n] = torch.from_numpy(d.cols)
        if b > n:
            host.inputs[:, n:b] = torch.tensor(self.decode.padding(), dtype=torch.long)[:, None]
        self.decode.inputs[:, :b].copy_(host.inputs[:, :b], non_blocking=True)
        hit = self.graphs.replay(b, mode)
        return ("graph" if hit else "eager"), b

    def _run_mixed(self, batch: StepBatch, plain: bool) -> int:
        """One forward over decode rows as 1-token chunks first, then the prefill chunks: piecewise
        graphs when the tokens fit a captured size (returned), else eager (0)."""
        c = batch.chunks
        d_tokens, d_src, d_positions, d_table_rows, d_slots, d_steps = batch.decode.cols.tolist()
        nd = len(batch.decode)
        q_lens = [1] * nd + c.q_lens
        ends = list(itertools.accumulate(q_lens))
        picked = [i for i, smp in enumerate(c.sample) if smp]
        logit_rows = list(range(nd)) + [ends[nd + i] - 1 for i in picked]
        ns = len(logit_rows)
        logit_rows += [0] * (-ns % LOGIT_ROWS)                   # padding rows: sliced off below
        tok_rows = d_table_rows + [r for r, q in zip(c.table_rows, c.q_lens) for _ in range(q)]
        cols = [d_tokens + c.tokens, d_positions + c.positions, d_slots + c.slots, tok_rows, d_src,
                logit_rows, d_table_rows + [c.table_rows[i] for i in picked],
                d_steps + [c.steps[i] for i in picked]]
        size = self.mixed.fits(len(cols[0]))
        if not size:   # eager: tokens, positions, slots padded to the rows every matmul sees
            pad = [0] * (eager_rows(len(cols[0])) - len(cols[0]))
            cols[:3] = [x + pad for x in cols[:3]]
        # Each column starts 16-byte aligned in the one H2D buffer (int64: an even offset): Triton
        # compiles a pointer's 16-byte alignment into the kernel, so a column at an odd offset (an
        # odd token count) would need a second variant of the rope kernel, JIT-compiled mid-run.
        sizes = [len(x) for x in cols]
        flat = self._to_device(list(itertools.chain.from_iterable(x + [0] * (len(x) % 2) for x in cols)))
        pieces = flat.split([n + n % 2 for n in sizes])
        tokens, positions, slots, rows, src, logit_rows_t, samp_rows, steps = (
            piece[:n] for piece, n in zip(pieces, sizes))
        if nd:   # decode rows whose input is still on the device
            tokens = tokens.clone()
            tokens[:nd] = torch.where(src >= 0, self.out.tokens[src.clamp(min=0)], tokens[:nd])
        n = len(rows)
        self.kv.write_table(rows, positions[:n], slots[:n])
        meta = K.PrefillMeta.build(q_lens, [p + 1 for p in d_positions] + c.kv_lens,
                                   d_table_rows + c.table_rows, self.device, tile_tokens=self.tile_tokens)
        if size:
            logits = self.mixed.run(size, tokens, positions, slots, meta, logit_rows_t)
        else:
            logits = self.model.forward_mixed(tokens, positions, slots, meta, self.kv, logit_rows_t)
        logits = logits[:ns]
        if plain:
            self.out.tokens[:ns].copy_(greedy(logits))
        else:
            self.tables.full(logits, samp_rows, steps, self.out.view(ns))
        return size or 0

    def _copy_out(self, n: int, kind: str, bucket: int, host: HostBuffers, want_lp: bool,
                  started_at: float) -> InFlight:
        nb = self.device.type == "cuda"
        host.tokens[:n].copy_(self.out.tokens[:n], non_blocking=nb)
        if want_lp:
            host.logprob[:n].copy_(self.out.logprob[:n], non_blocking=nb)
            host.top_ids[:n].copy_(self.out.top_ids[:n], non_blocking=nb)
            host.top_logprobs[:n].copy_(self.out.top_logprobs[:n], non_blocking=nb)
        event = self._events[self._host.index(host)]
        if event is not None:
            event.record()
        return InFlight(n, kind, bucket, host, want_lp, event, started_at, time.perf_counter())

    def collect(self, step: InFlight) -> tuple[list[int], Optional[list[TokenLogprob]]]:
        """The step's sampled tokens (and logprobs); the one host wait of a step."""
        if step.event is not None:
            step.event.synchronize()
        h, n = step.host, step.n
        tokens = h.tokens[:n].tolist()
        if not step.logprobs:
            return tokens, None
        lps = [TokenLogprob(t, lp, tuple(zip(ids, vals))) for t, lp, ids, vals in
               zip(tokens, h.logprob[:n].tolist(), h.top_ids[:n].tolist(), h.top_logprobs[:n].tolist())]
        return tokens, lps

    def _to_device(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # -- introspection (tests, stats) -----------------------------------------------------------
    def input_addresses(self) -> list[int]:
        """Static buffers the graphs read: decode inputs and outputs, and the mixed-step pieces'."""
        m = self.mixed
        mixed = [m.cols, m.q, m.a, m.residual] if m.sizes else []
        return [t.data_ptr() for t in [self.decode.inputs, self.decode.logits, self.out.tokens, *mixed]]
