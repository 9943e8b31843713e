"""Engine configuration: one frozen dataclass, validated at construction.

Every check raises `ConfigError` with a message that says what to change. The engine never reads
configuration from anywhere else (no env vars, no globals); the Ray boundary (deployments/) turns its
pydantic models into an `EngineConfig`.

Sizing (paged KV, docs/engine-internals.md): the KV pool is a number of `block_size`-token blocks
that fill the memory budget; a sequence holds only the blocks its tokens need. `max_num_seqs` (the
decode rows) and the bucket ladder follow from that pool and `expected_seq_len`, not from
`max_seq_len`, unless given explicitly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

DTYPES = ("auto", "float32", "bfloat16", "float16")
FALLBACKS = ("eager", "queue")
# The bucket ladder the engine captures when `batch_buckets` is not given: dense where padding
# costs most (small batches), sparser above. Cut at max_num_seqs, which is always a bucket.
LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
DEFAULT_BUCKETS = LADDER[:LADDER.index(64) + 1]   # CPU default: (1, 2, 4, ..., 64)
# Padded token counts the mixed-step piece graphs can be captured at (replica/mixed_graphs.py):
# powers of two, then steps of 1.5x from 128 up, so a step near the top pads by at most half (a
# 1088-token llama-1b step padded to 2048 ran 0.75x as fast as eager: up there the GPU, not the
# host, is the bound). Multiples of 16, so Triton's alignment specialization is the same for all.
MIXED_LADDER = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
MAX_ROWS_CUDA = 512        # decode rows beyond this gain little: the step is past the weights-bound knee
DEFAULT_CPU_ROWS = 64


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
    # Decode batch sizes that get a CUDA graph each. Sorted, unique, positive. None: the LADDER up
    # to max_num_seqs (which then becomes the largest bucket).
    batch_buckets: Optional[tuple[int, ...]] = None
    # Longest sequence (prompt + generated) one request may reach.
    max_seq_len: int = 2048
    # Sequence length the pool is sized for when max_num_seqs is None: rows = KV tokens / this.
    # None: min(max_seq_len, 1024). Admitting more than fits is safe (preemption), so err high.
    expected_seq_len: Optional[int] = None
    # Sequences admitted at once (decode rows). None: what the KV pool holds at expected_seq_len,
    # capped at 512 on CUDA (64 on CPU) and rounded down to a LADDER value; with batch_buckets
    # given, at most the largest bucket.
    max_num_seqs: Optional[int] = None
    # Tokens per KV block: the unit of allocation and of prefix caching.
    block_size: int = 16
    # Reuse the KV blocks of identical prompt prefixes across requests (content-hashed blocks).
    enable_prefix_cache: bool = True
    # KV pool budget in bytes. None: on CUDA, `memory_utilization` of the card minus weights,
    # measured activation/graph memory and sampler tables; on CPU, max_num_seqs full sequences.
    kv_cache_bytes: Optional[int] = None
    # Fraction of the GPU's total memory this engine may hold (weights + graphs + KV pool), counted
    # from what it allocates itself: two engines at 0.45 share one GPU (vLLM's gpu_memory_utilization).
    memory_utilization: float = 0.90
    # A decode batch larger than the largest captured bucket: "eager" runs it without a graph
    # (counted as a fallback step); "queue" never runs it, extra requests wait for a free row.
    fallback: Literal["eager", "queue"] = "eager"
    # Capture CUDA graphs on CUDA devices. False runs every decode step eagerly (debugging).
    use_cuda_graphs: bool = True
    # Tokens one step may carry: every decode row counts one, waiting prompts fill the rest in
    # chunks. Bounds how long a step holds the running decodes back. None: on CUDA, the tokens
    # whose matmuls make a ~50 ms step on an H100/H200 (replica/sizing.py `step_budget`: llama-8b
    # 2560, llama-1b 16128); on CPU 2048.
    step_token_budget: Optional[int] = None
    # Mixed (prefill + decode) steps of up to this many tokens replay piecewise CUDA graphs
    # (everything but attention captured at the MIXED_LADDER sizes up to it; replica/mixed_graphs.py);
    # larger ones run eagerly. None: sized so that the captured steps are the ones whose launches
    # would take longer than their GPU work (replica/sizing.py `mixed_graph_tokens`: llama-8b 384,
    # llama-1b 1024). 0: every mixed step eager. CUDA only.
    mixed_graph_tokens: Optional[int] = None
    # Where the step loop runs: "process" (a child process: the GPU loop never waits for the
    # caller's GIL, the setting for servers; the caller then never imports torch), "thread"
    # (in-process), "auto" (process when a CUDA driver and visible GPUs exist: engine._use_process).
    engine_process: Literal["auto", "thread", "process"] = "auto"
    # Requests waiting for admission beyond the running rows; a submit past it raises
    # EngineOverloadedError. None: no bound.
    max_queued_requests: Optional[int] = None
    # Longest output first, within a window: the next admission is the waiting request with the
    # most output tokens left among those that arrived within this many seconds of the oldest one
    # waiting. A burst's sequences then finish close together, so its tail of small decode batches
    # is shorter (SGLang's longest-output-first); no request waits behind one that arrived more
    # than the window after it. 0: strictly in order of arrival.
    admission_window_s: float = 2.0
    # Seed for random weights (random:* models) and for requests that do not give one.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_buckets is not None and not isinstance(self.batch_buckets, tuple):
            object.__setattr__(self, "batch_buckets", tuple(self.batch_buckets))  # lists from YAML
        _validate(self)

    @property
    def expected_len(self) -> int:
        return self.expected_seq_len or min(self.max_seq_len, 1024)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def ladder_up_to(rows: int) -> tuple[int, ...]:
    """The default bucket ladder cut at `rows`, with `rows` itself as the largest bucket."""
    return tuple(b for b in LADDER if b < rows) + (rows,)


def round_rows(rows: int) -> int:
    """Round a row count down to a LADDER value (so the largest bucket is a ladder step)."""
    fit = [b for b in LADDER if b <= rows]
    return fit[-1] if fit else 1


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
    if b is not None:
        if not b or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b):
            fail(f"batch_buckets={list(b)} must be a non-empty list of positive integers, e.g. [1, 2, 4, 8]")
        if list(b) != sorted(set(b)):
            fail(f"batch_buckets={list(b)} must be sorted and unique, e.g. {sorted(set(b))}")
    if c.max_seq_len < 2:
        fail(f"max_seq_len={c.max_seq_len} must be at least 2 (one prompt token and one new token)")
    if c.expected_seq_len is not None and not 1 <= c.expected_seq_len <= c.max_seq_len:
        fail(f"expected_seq_len={c.expected_seq_len} must be in [1, max_seq_len={c.max_seq_len}]")
    if c.max_num_seqs is not None and c.max_num_seqs < 1:
        fail(f"max_num_seqs={c.max_num_seqs} must be positive, or None to size it from memory")
    if c.block_size < 1 or c.block_size & (c.block_size - 1):
        fail(f"block_size={c.block_size} must be a power of two, e.g. 16")
    if c.kv_cache_bytes is not None and c.kv_cache_bytes <= 0:
        fail(f"kv_cache_bytes={c.kv_cache_bytes} must be positive, or None to size it from memory")
    if not 0.05 <= c.memory_utilization <= 0.99:
        fail(f"memory_utilization={c.memory_utilization} must be between 0.05 and 0.99")
    if c.fallback not in FALLBACKS:
        fail(f"fallback={c.fallback!r} must be one of {FALLBACKS}")
    if not c.admission_window_s >= 0:
        fail(f"admission_window_s={c.admission_window_s} must be >= 0 (0: admit in order of arrival)")
    if c.engine_process not in ("auto", "thread", "process"):
        fail(f"engine_process={c.engine_process!r} must be 'auto', 'thread' or 'process'")
    if c.step_token_budget is not None and c.step_token_budget < 1:
        fail(f"step_token_budget={c.step_token_budget} must be positive")
    if c.mixed_graph_tokens is not None and c.mixed_graph_tokens < 0:
        fail(f"mixed_graph_tokens={c.mixed_graph_tokens} must be >= 0 (0: no mixed-step graphs), or None")
    if c.max_queued_requests is not None and c.max_queued_requests < 0:
        fail(f"max_queued_requests={c.max_queued_requests} must be >= 0, or None for no bound")
    if b is not None and c.max_num_seqs is not None and c.max_num_seqs > b[-1]:
        if c.fallback == "queue":
            fail(f"max_num_seqs={c.max_num_seqs} exceeds the largest bucket {b[-1]} with fallback='queue': "
                 f"add a bucket >= {c.max_num_seqs}, lower max_num_seqs, or set fallback='eager'")
