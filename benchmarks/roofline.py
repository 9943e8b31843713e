"""The bounds a benchmark result is read against, and the two device rates they use.

Contract
- `copy_bandwidth(device)`: bytes/s of a large device-to-device copy, counting bytes read + written;
  `gemm_rate(device)`: FLOP/s of an 8192^3 bf16 matmul. Both measured in the run that uses them,
  each the stricter (higher) of the two ways to time it (benchmarks/rate_probe.py, session 23):
  the copy sustained, back to back after a warm-up (4210-4260 GB/s on an H200, against 4004-4177
  timing single calls); the GEMM by single calls on the card as the run finds it (715-798
  TFLOP/s over sessions 4-23), since back-to-back matmuls run power-limited at 664-685, below
  the 736 that the engine's own mixed-step GEMMs reach between memory-bound kernels.
- `step_bytes(name, batch, context)` counts the bytes one decode step must read: each weight matrix
  once (q/k/v/o, gate/up/down, norms, lm_head), an untied embedding only for the `batch` rows used (a
  tied embedding IS the lm_head and is counted once, fully), plus the KV cache actually attended
  (batch x context positions x layers x K and V). `floor_ms = step_bytes / copy bandwidth`.
- `roofline(name, requests, kv_tokens, F, BW)`: issue 8's T_roof of a set of (prompt, output)
  requests on one GPU; `work_floor(name, requests, F, BW)`: what they cost whatever the schedule
  (every token's matmuls at F + the KV bytes decode attention reads at BW).
- `name` is a key of `PRESETS` (the engine's `random:<name>` shapes, replica/presets.py, which the
  HF baselines build too, so both sides read the same bytes per step) or a checkpoint directory,
  whose config.json gives the same fields (`layout`). No ray; torch only inside the two rate
  measurements.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time
from typing import Sequence

from benchmarks.common import free_device_memory, sync
from replica.presets import PRESETS  # the engine's random:<name> shapes; the HF twins use them too


# ---------------------------------------------------------------- device rates

def seconds_per_call(op, device, reps: int = 7, per_timing: int = 10, warmup_s: float = 0.5,
                     warmup_calls: int = 1) -> float:
    """Seconds of one `op()`: the median over `reps` timings of `per_timing` calls back to back,
    after at least `warmup_calls` calls and `warmup_s` of them. The defaults time it sustained:
    one sync per 10 calls puts the host's sync jitter at a tenth of a call, and the warm-up lets
    clocks settle. `per_timing=1, warmup_s=0` times single calls on the card as it is."""
    t0, calls = time.perf_counter(), 0
    while calls < warmup_calls or time.perf_counter() - t0 < warmup_s:
        op()
        sync(device)
        calls += 1
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(per_timing):
            op()
        sync(device)
        ts.append((time.perf_counter() - t) / per_timing)
    return statistics.median(ts)


SINGLE_CALLS = dict(reps=10, per_timing=1, warmup_s=0.0, warmup_calls=3)   # gemm_rate's timing


def copy_bandwidth(device, nbytes: int = 1 << 30, **timing) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read + written; timed sustained."""
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    op = functools.partial(dst.copy_, src)
    seconds = seconds_per_call(op, device, **timing)
    del src, dst, op
    free_device_memory(device)
    return 2 * nbytes / seconds


def gemm_rate(device, n: int = 8192, reps: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matmul on random data: the median of `reps` single calls after
    three (the module docstring says why not sustained)."""
    import torch
    a, b, c = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(3))
    op = functools.partial(torch.matmul, a, b, out=c)
    seconds = seconds_per_call(op, device, **{**SINGLE_CALLS, "reps": reps})
    del a, b, c, op
    free_device_memory(device)
    return 2 * n ** 3 / seconds


# ---------------------------------------------------------------- the decode floor

LAYOUT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "tie_word_embeddings", "head_dim")


@functools.lru_cache(maxsize=None)
def layout(name: str) -> dict:
    """The shape fields the bounds read: a preset's, or a checkpoint directory's config.json."""
    if name in PRESETS:
        return PRESETS[name]
    path = os.path.join(name, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint "
                         "directory with a config.json")
    with open(path) as f:
        cfg = json.load(f)
    fields = {k: cfg[k] for k in LAYOUT_FIELDS if cfg.get(k) is not None}
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    return fields


def known(name: str) -> bool:
    """Whether `layout(name)` can answer (so a benchmark can report a roofline for it)."""
    return name in PRESETS or os.path.isfile(os.path.join(name, "config.json"))


def weight_bytes(name: str, batch: int, dtype_bytes: int = 2) -> int:
    """Weight bytes one decode step must read (see module docstring)."""
    p = layout(name)
    h, i, nl = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"]
    hd = p.get("head_dim") or h // p["num_attention_heads"]
    q = p["num_attention_heads"] * hd
    kv = p["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    vocab_read = p["vocab_size"] * h                       # lm_head (= the tied embedding)
    if not p.get("tie_word_embeddings", False):
        vocab_read += min(batch, p["vocab_size"]) * h      # only the embedding rows used
    return (nl * per_layer + h + vocab_read) * dtype_bytes


def kv_bytes_per_token(name: str, dtype_bytes: int = 2) -> int:
    p = layout(name)
    hd = p.get("head_dim") or p["hidden_size"] // p["num_attention_heads"]
    return p["num_hidden_layers"] * 2 * p["num_key_value_heads"] * hd * dtype_bytes


def step_bytes(name: str, batch: int, context: float, dtype_bytes: int = 2) -> dict:
    w = weight_bytes(name, batch, dtype_bytes)
    kv = int(batch * context * kv_bytes_per_token(name, dtype_bytes))
    return {"weights": w, "kv": kv, "total": w + kv}


def floor_ms(name: str, batch: int, context: float, copy_Bps: float, dtype_bytes: int = 2) -> float:
    return step_bytes(name, batch, context, dtype_bytes)["total"] / copy_Bps * 1e3


# ---------------------------------------------------------------- the roofline of a loaded replica

def prefill_flops(name: str, prompt_tokens: int, prompts: int) -> float:
    """Matmul FLOPs of prefilling: every layer's weight matrices for every prompt token, the lm_head
    once per prompt (only the last position's logits are needed). Attention FLOPs are left out, as
    in the roofline's definition, which makes the bound conservative for long prompts."""
    p = layout(name)
    layers = weight_bytes(name, 0, 1) - p["vocab_size"] * p["hidden_size"] - p["hidden_size"]
    layers -= p["num_hidden_layers"] * 2 * p["hidden_size"]            # norms are not matmuls
    return 2.0 * layers * prompt_tokens + 2.0 * p["vocab_size"] * p["hidden_size"] * prompts


def roofline(name: str, requests: Sequence[tuple[int, int]], kv_tokens: int, gemm_Fps: float,
             copy_Bps: float) -> dict:
    """T_roof of a set of requests (prompt, output) on one GPU:

        prefill FLOPs / F + (sum(output) / R) x (weight bytes + R x mean context x KV bytes/token) / BW

    R = rows the KV budget (`kv_tokens`) holds at the mean sequence length, capped by the number of
    requests; mean context = mean prompt + half the mean output (the average decode position)."""
    n = len(requests)
    P = sum(p for p, _ in requests)
    O = sum(o for _, o in requests)
    mean_seq = (P + O) / n
    R = max(1, min(n, int(kv_tokens // mean_seq)))
    ctx = P / n + O / n / 2
    prefill_s = prefill_flops(name, P, n) / gemm_Fps
    step_s = (weight_bytes(name, R) + R * ctx * kv_bytes_per_token(name)) / copy_Bps
    decode_s = O / R * step_s
    return {"t_roof_s": prefill_s + decode_s, "prefill_s": prefill_s, "decode_s": decode_s, "rows": R,
            "mean_context": ctx, "prompt_tokens": P, "output_tokens": O}


def work_floor(name: str, requests: Sequence[tuple[int, int]], gemm_Fps: float, copy_Bps: float) -> dict:
    """What the same requests cost at the measured rates whatever the schedule, for an engine that
    runs matmuls and attention as separate kernels (as every engine here does):

        matmul FLOPs of every token (prompt and output: layers, lm_head) / F
        + causal attention FLOPs of every prompt / F + KV bytes decode attention reads / BW

    The roofline's decode term assumes a decode step is bandwidth-bound at R rows. Past
    R ~ F x weight bytes / (2 x params x BW) rows (~100 for llama-8b on an H200) a step's matmuls
    take longer than reading the weights, so at R = 500 T_roof undercounts decode; this floor does
    not: T_roof / floor is the roofline_fraction a perfect engine of that kind would reach. Mean
    context as in roofline()."""
    n = len(requests)
    P = sum(q for q, _ in requests)
    O = sum(o for _, o in requests)
    ctx = P / n + O / n / 2
    flops = prefill_flops(name, P, n) + prefill_flops(name, O, O)     # an output token = a 1-token prefill
    compute_s = flops / gemm_Fps
    prompt_attention_s = sum(prompt_attention_flops(name, q) for q, _ in requests) / gemm_Fps
    attention_s = O * ctx * kv_bytes_per_token(name) / copy_Bps
    return {"floor_s": compute_s + prompt_attention_s + attention_s, "matmul_s": compute_s,
            "prompt_attention_s": prompt_attention_s, "attention_s": attention_s}


def prompt_attention_flops(name: str, prompt_tokens: int) -> float:
    """FLOPs of one prompt's causal attention over itself: two matmuls of 2 x head_dim FLOPs per
    (query head, query, key <= query) in every layer. Negligible at a few hundred tokens (llama-8b,
    300: 0.6% of the prompt's matmul FLOPs), 15% at 8k, 62% at 32k; the roofline leaves it out."""
    p = layout(name)
    hd = p.get("head_dim") or p["hidden_size"] // p["num_attention_heads"]
    pairs = prompt_tokens * (prompt_tokens + 1) / 2
    return 4 * hd * p["num_attention_heads"] * pairs * p["num_hidden_layers"]
