"""Engine configuration: one frozen dataclass, validated at construction.

Every check raises `ConfigError` with a message that says what to change. The engine never reads
configuration from anywhere else (no env vars, no globals); the Ray boundary (deployments/) turns its
pydantic models into an `EngineConfig`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

DTYPES = ("auto", "float32", "bfloat16", "float16")
FALLBACKS = ("eager", "queue")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ConfigError(ValueError):
    """An invalid EngineConfig; the message names the field and the fix."""


@dataclass(frozen=True)
class EngineConfig:
    # Where the weights come from: a local Hugging Face checkpoint directory, or "random:<preset>"
    # (tiny, llama-1b, llama-8b) for seeded random weights with a byte-level tokenizer.
    model: str = "random:tiny"
    # "auto": bfloat16 on CUDA, float32 on CPU.
    dtype: str = "auto"
    # "auto": cuda:0 if CUDA is available (Ray pins one GPU per replica), else cpu.
    device: str = "auto"
    # Decode batch sizes that get a CUDA graph each. Sorted, unique, positive.
    batch_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    # Longest sequence (prompt + generated) a request may reach; each KV slot holds this many tokens.
    max_seq_len: int = 2048
    # Concurrent sequences (KV slots). None: the largest bucket, or fewer if the KV budget cannot
    # hold that many full-length sequences. More than the largest bucket needs fallback='eager'.
    max_num_seqs: Optional[int] = None
    # KV pool budget in bytes. None: on CUDA, `memory_utilization` of the card minus weights and
    # measured graph memory; on CPU, exactly enough for max_num_seqs (default: the largest bucket).
    kv_cache_bytes: Optional[int] = None
    # Fraction of the GPU's total memory the engine may hold (weights + graphs + KV pool).
    memory_utilization: float = 0.90
    # A decode batch larger than the largest captured bucket: "eager" runs it without a graph
    # (counted as a fallback step); "queue" never runs it, extra requests wait for a free row.
    fallback: Literal["eager", "queue"] = "eager"
    # Capture CUDA graphs on CUDA devices. False runs every decode step eagerly (debugging).
    use_cuda_graphs: bool = True
    # Prompt tokens prefilled per engine step: a long prompt is split into chunks so one request
    # cannot stall the running decodes for longer than one chunk.
    prefill_chunk_tokens: int = 512
    # Where the step loop runs: "process" (a child process: the GPU loop never waits for the
    # caller's GIL, the setting for servers), "thread" (in-process), "auto" (process on CUDA).
    engine_process: Literal["auto", "thread", "process"] = "auto"
    # Seed for random weights (random:* models) and for requests that do not give one.
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.batch_buckets, tuple):  # lists from YAML/pydantic: freeze them
            object.__setattr__(self, "batch_buckets", tuple(self.batch_buckets))
        _validate(self)

    @property
    def max_bucket(self) -> int:
        return self.batch_buckets[-1]

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def _validate(c: EngineConfig) -> None:
    def fail(msg: str) -> None:
        raise ConfigError(msg)

    if not isinstance(c.model, str) or not c.model:
        fail("model must be a local checkpoint directory or 'random:<preset>'")
    if c.dtype not in DTYPES:
        fail(f"dtype={c.dtype!r} is not supported; use one of {DTYPES}")
    if not (c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:")):
        fail(f"device={c.device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    b = c.batch_buckets
    if not b or any((not isinstance(x, int)) or x < 1 for x in b):
        fail(f"batch_buckets={list(b)} must be a non-empty list of positive integers, e.g. [1, 2, 4, 8]")
    if list(b) != sorted(set(b)):
        fail(f"batch_buckets={list(b)} must be sorted and unique, e.g. {sorted(set(b))}")
    if c.max_seq_len < 2:
        fail(f"max_seq_len={c.max_seq_len} must be at least 2 (one prompt token and one new token)")
    if c.max_num_seqs is not None and c.max_num_seqs < 1:
        fail(f"max_num_seqs={c.max_num_seqs} must be positive, or None to size it from memory")
    if c.kv_cache_bytes is not None and c.kv_cache_bytes <= 0:
        fail(f"kv_cache_bytes={c.kv_cache_bytes} must be positive, or None to size it from memory")
    if not 0.05 <= c.memory_utilization <= 0.99:
        fail(f"memory_utilization={c.memory_utilization} must be between 0.05 and 0.99")
    if c.fallback not in FALLBACKS:
        fail(f"fallback={c.fallback!r} must be one of {FALLBACKS}")
    if c.engine_process not in ("auto", "thread", "process"):
        fail(f"engine_process={c.engine_process!r} must be 'auto', 'thread' or 'process'")
    if c.prefill_chunk_tokens < 1:
        fail(f"prefill_chunk_tokens={c.prefill_chunk_tokens} must be positive")
    if c.fallback == "queue" and c.max_num_seqs is not None and c.max_num_seqs > b[-1]:
        fail(f"max_num_seqs={c.max_num_seqs} exceeds the largest bucket {b[-1]} with fallback='queue': "
             f"add a bucket >= {c.max_num_seqs}, lower max_num_seqs, or set fallback='eager'")
