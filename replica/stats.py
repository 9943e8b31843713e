"""`EngineStats`: a cheap, picklable snapshot of what the engine holds and has done.

Counters are totals since start (consumers take deltas). Step kinds: a "decode" step runs only
decode rows, by graph replay ("graph") or eagerly ("eager": no captured bucket holds it, or CPU);
a "mixed" step runs prefill chunks (with any decode rows) in one eager forward. Graph-hit is
reported over decode steps only; the share of mixed steps separately.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class StartupReport:
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    graph_bytes: int = 0
    graph_bytes_estimate: int = 0   # reserved before sizing the KV pool (measured activation peak)
    process_seconds: float = 0.0    # process start until the engine core begins building (process backend)
    imports_seconds: float = 0.0    # of which the engine process's imports (torch, triton, replica)
    device_init_seconds: float = 0.0  # CUDA context on the engine's device
    load_seconds: float = 0.0       # weights
    sizing_seconds: float = 0.0     # activation probe + KV allocation
    compile_seconds: float = 0.0    # of which compiling the probe's Triton kernels ahead, in parallel
    warmup_seconds: float = 0.0     # Triton JIT + first runs, before capture
    capture_seconds: float = 0.0
    ready_seconds: float = 0.0      # Engine() call until it accepts requests


@dataclass(frozen=True)
class EngineStats:
    captured_buckets: tuple[int, ...]
    graphs: bool
    max_seq_len: int
    max_num_seqs: int
    running: int
    free_slots: int                 # further sequences admissible now (free rows)
    queued: int
    fallback: str
    max_queued: Optional[int] = None  # EngineConfig.max_queued_requests
    block_size: int = 0
    total_blocks: int = 0
    free_blocks: int = 0            # free + evictable cached
    cached_blocks: int = 0          # blocks indexed by the prefix cache
    prefill_backlog_tokens: int = 0
    decode_rows: int = 0
    decode_steps: dict = field(default_factory=dict)   # (bucket, "graph"|"eager") -> steps
    padded_rows: dict = field(default_factory=dict)    # bucket -> padding rows run
    mixed_steps: int = 0
    mixed_graph_steps: int = 0      # mixed steps that replayed piecewise graphs (replica/mixed_graphs.py)
    prefill_tokens: int = 0         # tokens run in prefill chunks (prompts and recomputes)
    mixed_decode_rows: int = 0      # decode rows that ran inside mixed steps
    generated_tokens: int = 0
    prompt_tokens: int = 0          # prompt tokens of admitted requests (cached ones included)
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    preemptions: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    prefill_tokens_per_s: float = 0.0               # median over mixed steps (replica/measured.py)
    decode_step_s: dict = field(default_factory=dict)  # bucket -> step seconds (replica/measured.py)
    mean_output_tokens: float = 0.0                 # finished sequences' output tokens (moving average)
    min_remaining_steps: int = 0                    # decode steps until the first running row frees
    prefix_hashes: Optional[tuple[int, ...]] = ()   # cached prefix summary (router); None: unchanged
    prefix_summary_time: float = 0.0                # wall clock when that summary was built (0: never)
    startup: StartupReport = field(default_factory=StartupReport)

    @property
    def weights_bytes(self) -> int:
        return self.startup.weights_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self.startup.kv_cache_bytes

    @property
    def graph_bytes(self) -> int:
        return self.startup.graph_bytes

    @property
    def load_seconds(self) -> float:
        return self.startup.load_seconds

    @property
    def capture_seconds(self) -> float:
        return self.startup.capture_seconds

    def graph_hit_rate(self) -> float:
        """Graph replays over decode steps (mixed steps excluded: they are eager by design)."""
        total = sum(self.decode_steps.values())
        graph = sum(v for (_, path), v in self.decode_steps.items() if path == "graph")
        return graph / total if total else 0.0

    def mixed_share(self) -> float:
        total = sum(self.decode_steps.values()) + self.mixed_steps
        return self.mixed_steps / total if total else 0.0

    def prefix_hit_rate(self) -> float:
        q = self.prefix_queried_tokens
        return self.prefix_hit_tokens / q if q else 0.0

    def kv_usage(self) -> float:
        usable = max(self.total_blocks - 1, 1)
        return 1.0 - self.free_blocks / usable
