"""How many KV blocks, decode rows and buckets an engine gets: decided once, at startup.

CUDA (`plan_cuda`), after the weights are loaded:
1. rows: `max_num_seqs`, else the largest given bucket, else what the free memory would hold at
   `expected_seq_len` tokens per sequence, capped at MAX_ROWS_CUDA and rounded down to a ladder step;
2. activation: the peak extra memory of one full-mode decode step at those rows plus one mixed
   forward of the step token budget, measured eagerly against a two-block probe cache (it
   bounds the graph pool and the mixed step's transient tensors); reserved x1.2 + 64 MiB;
3. blocks: `kv_cache_bytes`, else memory_utilization x total - what this engine holds - the
   reserve, never more than is free (vLLM's gpu_memory_utilization: a share of the card per engine,
   so two engines at 0.45 share one GPU whichever starts first; what the engine holds is its
   process's allocator, so memory of other processes is theirs, not ours);
4. rows again: never more than the pool holds at `expected_seq_len` (unless max_num_seqs was given);
5. buckets: `batch_buckets`, else the ladder up to rows.
The step token budget (`step_budget`, both devices): `step_token_budget` if given; else on CUDA
the tokens whose matmuls come to STEP_FLOPS, so a full mixed step takes about as long whatever the
model; on CPU DEFAULT_STEP_TOKENS.
CPU (`plan_cpu`): rows from the config (default 64), blocks for that many full-length sequences
unless `kv_cache_bytes` says otherwise. Every plan is logged with its inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from replica.config import (DEFAULT_CPU_ROWS, MAX_ROWS_CUDA, MIXED_LADDER, ConfigError, EngineConfig,
                            ladder_up_to, round_rows)

log = logging.getLogger("replica")


# A full mixed step's matmul FLOPs when the budget is not given: ~50 ms at an H100/H200's ~800
# TFLOP/s. Measured on H200 (results/engine_capacity-step-budget-*): llama-1b's burst took 2.96 /
# 2.47 / 2.32 s at 2048 / 8192 / 16384 tokens per step (its 2048-token steps ran at ~46% of the
# GEMM rate); llama-8b's 10.84 / 10.75 / 10.71 s at 2048 / 4096 / 8192, already efficient at 2048.
STEP_FLOPS = 40e12
STEP_TOKENS_MIN, STEP_TOKENS_MAX = 2048, 16384
DEFAULT_STEP_TOKENS = 2048       # CPU


def step_budget(c: EngineConfig, matmul_params: int, cuda: bool) -> int:
    """Tokens one step may carry: the config's, else (CUDA) STEP_FLOPS / (2 x matmul_params)
    rounded down to 256 and clamped to [STEP_TOKENS_MIN, STEP_TOKENS_MAX], else (CPU) 2048."""
    if c.step_token_budget is not None:
        return c.step_token_budget
    if not cuda:
        return DEFAULT_STEP_TOKENS
    fit = int(STEP_FLOPS / (2 * max(1, matmul_params))) // 256 * 256
    return max(STEP_TOKENS_MIN, min(STEP_TOKENS_MAX, fit))


# Mixed steps worth a piecewise graph (replica/mixed_graphs.py): those whose matmuls take less GPU
# time than their eager launches take on the host, ~0.3 ms per layer on an H200 host
# (results/mixed_step_probe-h200-2026-11-30.json: llama-8b 10 ms of launches over 32 layers, llama-1b
# 5-6 ms over 16), at ~750 TFLOP/s: the largest MIXED_LADDER size at or below that
# token count (llama-8b 480 -> 384, llama-1b 1456 -> 1024), at most MIXED_TOKENS_MAX.
HOST_S_PER_LAYER = 0.3e-3
GEMM_FLOPS = 750e12
MIXED_TOKENS_MAX = 2048


def mixed_graph_tokens(c: EngineConfig, matmul_params: int, num_layers: int, cuda: bool) -> int:
    """Largest token count of a mixed step that replays graphs: the config's, else (CUDA) the
    largest captured size whose matmuls take at most HOST_S_PER_LAYER x layers (0 if none); 0 on
    CPU (no graphs)."""
    if not cuda:
        return 0
    if c.mixed_graph_tokens is not None:
        return c.mixed_graph_tokens
    fit = min(MIXED_TOKENS_MAX, HOST_S_PER_LAYER * num_layers * GEMM_FLOPS / (2 * max(1, matmul_params)))
    return max((s for s in MIXED_LADDER if s <= fit), default=0)


@dataclass(frozen=True)
class MemoryPlan:
    num_blocks: int               # incl. the scratch block
    rows: int                     # max_num_seqs: sequences admitted at once
    buckets: tuple[int, ...]
    activation_bytes: int = 0     # reserved for graphs and mixed steps (CUDA)


def _explicit_rows(c: EngineConfig) -> int:
    return c.max_num_seqs or (c.batch_buckets[-1] if c.batch_buckets else 0)


def _buckets(c: EngineConfig, rows: int) -> tuple[int, ...]:
    return c.batch_buckets if c.batch_buckets is not None else ladder_up_to(rows)


def plan_cpu(c: EngineConfig, bytes_per_block: int) -> MemoryPlan:
    rows = _explicit_rows(c) or DEFAULT_CPU_ROWS
    per_seq = -(-c.max_seq_len // c.block_size)
    blocks = c.kv_cache_bytes // bytes_per_block if c.kv_cache_bytes else rows * per_seq + 1
    _check_blocks(c, blocks, bytes_per_block)
    return MemoryPlan(blocks, rows, _buckets(c, rows))


def rows_guess(c: EngineConfig, budget_bytes: int, bytes_per_token: int) -> int:
    """Step 1: the rows to probe activation memory at."""
    explicit = _explicit_rows(c)
    if explicit:
        return explicit
    fit = budget_bytes // max(1, bytes_per_token * c.expected_len)
    return max(1, min(MAX_ROWS_CUDA, round_rows(fit)))


def share_left(c: EngineConfig, total: int, free: int, own: int) -> int:
    """Bytes this engine may still allocate: its share of the card (`memory_utilization` x total)
    less what it already holds (`own`), and never more than is free now."""
    return min(int(total * c.memory_utilization) - own, free)


def plan_cuda(c: EngineConfig, total: int, free: int, own: int, activation_bytes: int,
              bytes_per_block: int, probed_rows: int) -> MemoryPlan:
    """Steps 3-5, given the measured activation peak at `probed_rows`; `own` is the memory this
    engine holds now (weights, sampler tables), `free` the card's free memory."""
    reserve = int(activation_bytes * 1.2) + (64 << 20)
    if c.kv_cache_bytes is not None:
        budget = c.kv_cache_bytes
    else:
        budget = share_left(c, total, free, own) - reserve
    blocks = budget // bytes_per_block + 1
    _check_blocks(c, blocks, bytes_per_block)
    rows = probed_rows
    if not _explicit_rows(c):
        held = (blocks - 1) * c.block_size // c.expected_len
        rows = max(1, min(rows, round_rows(held)))
    log.info("KV plan: %d blocks x %d tokens (%.2f GiB), %d rows, activation reserve %.0f MiB "
             "(expected_seq_len %d)", blocks, c.block_size, blocks * bytes_per_block / 2**30, rows,
             reserve / 2**20, c.expected_len)
    return MemoryPlan(blocks, rows, _buckets(c, rows), reserve)


def _check_blocks(c: EngineConfig, blocks: int, bytes_per_block: int) -> None:
    per_seq = -(-c.max_seq_len // c.block_size)
    if blocks - 1 < per_seq:
        raise ConfigError(
            f"the KV budget holds {max(blocks - 1, 0)} blocks of {c.block_size} tokens "
            f"({bytes_per_block / 2**20:.2f} MiB each), less than one sequence of max_seq_len="
            f"{c.max_seq_len} ({per_seq} blocks): lower max_seq_len, raise memory_utilization or "
            f"kv_cache_bytes, or use a smaller model")


def measure_peak(run: Callable[[], None], device) -> int:
    """Peak bytes allocated by `run()` above what was allocated before it (CUDA)."""
    import torch

    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    return int(peak)
