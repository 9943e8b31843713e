"""`EngineStats`: a cheap, thread-safe snapshot of what the engine holds and has done."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StartupReport:
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    graph_bytes: int = 0
    graph_bytes_estimate: int = 0   # reserved before sizing the KV pool (eager peak at the largest bucket)
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0     # Triton JIT + first runs, before capture
    capture_seconds: float = 0.0


@dataclass(frozen=True)
class EngineStats:
    captured_buckets: tuple[int, ...]
    graphs: bool
    max_seq_len: int
    max_num_seqs: int
    running: int
    free_slots: int
    queued: int
    fallback: str
    decode_steps: dict = field(default_factory=dict)   # (bucket, path) -> steps
    padded_rows: dict = field(default_factory=dict)    # bucket -> padding rows run
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
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
        total = sum(self.decode_steps.values())
        graph = sum(v for (_, path), v in self.decode_steps.items() if path == "graph")
        return graph / total if total else 0.0
