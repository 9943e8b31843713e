"""The engine as benchmarks/route_sim.py models it: one replica's steps, timed by a cost model.

Contract: `SimReplica(name, buckets, rows)`; `submit(seqs)` queues `Seq`s (FIFO); `step(now)`
plans and times one step the way replica/scheduler.py does (decode rows first, then prefill chunks
up to the step's token budget, at least a quarter of it; admission up to `rows`; a prompt's
cached leading blocks are skipped) and returns (seconds, sequences that got their first token,
sequences that finished); `stats(now)` is the `ReplicaStats` dict a replica would publish.

Cost model (llama-8b, one H200, fitted to benchmarks/results/engine_capacity-session5-8b-*): a
decode step at bucket b = the measured step at b less its KV reads at the measured context, plus
the KV reads of this step's contexts (128 KiB per token at 4.13 TB/s); eager (past the largest
bucket) x1.6; a mixed step = its prompt tokens at 75k tokens/s plus its decode rows' step. Not
modelled: preemption (the pool is large), sampling, host time, EOS (every sequence runs its
max_tokens, as serve_load's requests do with ignore_eos), and the engine's longest-output-first
admission window (EngineConfig.admission_window_s): admission here is first come, first served.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from replica.block_hash import block_hashes, is_summary_depth
from router.buckets import bucket_for
from router.stats import MAX_PREFIX_HASHES, ReplicaStats

# Decode step by bucket at ~450 tokens of context per row (results/engine_capacity-session5-8b-*):
MEASURED_STEP_MS = {1: 4.8, 2: 4.87, 4: 4.97, 8: 5.1, 16: 5.45, 24: 5.65, 32: 5.79, 48: 6.17, 64: 6.4,
                    96: 7.08, 128: 8.32, 160: 9.19, 192: 10.55, 256: 12.25, 320: 14.69, 384: 17.17,
                    448: 21.0, 512: 21.28}   # 448: 23.0 measured, above 512's: smoothed
KV_S_PER_TOKEN = 131072 / 4.13e12      # a row's context: 128 KiB of KV per token at the copy rate
MEASURED_CONTEXT = 450                 # mean context of the burst the table was measured on
PREFILL_TOKENS_PER_S = 75_000.0        # mixed steps of the 8B burst (64-88k, decode rows included)
EAGER_FACTOR = 1.6                     # router/estimate.EAGER_STEP_FACTOR: a step past the buckets
LADDER = tuple(sorted(MEASURED_STEP_MS))


def base_step_s(bucket: int) -> float:
    """The weight-bound part of a decode step at `bucket` rows (the table less its KV reads)."""
    known = max((b for b in MEASURED_STEP_MS if b <= bucket), default=1)
    return MEASURED_STEP_MS[known] / 1e3 - known * MEASURED_CONTEXT * KV_S_PER_TOKEN


@dataclass
class Seq:
    job: object                     # the request it belongs to (route_sim.SimJob), opaque here
    prompt: tuple[int, ...]
    max_tokens: int
    cached: int = 0
    computed: int = 0
    generated: int = 0
    first_token_at: Optional[float] = None

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt)


@dataclass
class SimReplica:
    """One engine: FIFO admission up to `rows`, a token budget per step, graph or eager steps."""
    name: str
    buckets: tuple[int, ...]
    rows: int
    budget: int = 2048
    block_size: int = 16
    cache_blocks: int = 50_000
    waiting: list = field(default_factory=list)
    running: list = field(default_factory=list)
    busy_until: float = 0.0
    stepping: bool = False
    cache: OrderedDict = field(default_factory=OrderedDict)   # block hash -> depth (LRU order)
    mean_output: float = 0.0
    sequences: int = 0

    def submit(self, seqs: list[Seq]) -> None:
        self.waiting.extend(seqs)
        self.sequences += len(seqs)

    def step(self, now: float) -> tuple[float, list[Seq], list[Seq]]:
        """Plan and time one step; returns (its duration, sequences that got their first token,
        sequences that finished)."""
        decode = [s for s in self.running if s.prefilled][: self.rows]
        budget = max(self.budget - len(decode), self.budget // 4)
        chunks = []
        for s in [s for s in self.running if not s.prefilled]:
            take = min(len(s.prompt) - s.computed, budget)
            if take > 0:
                chunks.append((s, take))
                budget -= take
        while budget > 0 and self.waiting and len(self.running) < self.rows:
            s = self.waiting.pop(0)
            s.cached = s.computed = self._match(s.prompt)
            self.running.append(s)
            take = min(len(s.prompt) - s.computed, budget)
            chunks.append((s, take))
            budget -= take
        prefill = sum(t for _, t in chunks)
        ctx = sum(len(s.prompt) + s.generated for s in decode)
        if prefill:
            dur = prefill / PREFILL_TOKENS_PER_S + (self._decode_s(len(decode), ctx) if decode else 0.0)
        else:
            dur = self._decode_s(len(decode), ctx)
        first, done = [], []
        for s, take in chunks:
            s.computed += take
            if s.prefilled:
                self._insert(s.prompt)
                s.generated = 1
                first.append(s)
        for s in decode:
            s.generated += 1
        for s in decode + [s for s, _ in chunks if s.prefilled]:
            if s.generated >= s.max_tokens and s not in done:
                done.append(s)
        for s in done:
            self.running.remove(s)
            self.mean_output = s.max_tokens if not self.mean_output else \
                self.mean_output + (s.max_tokens - self.mean_output) / 32
        return dur, first, done

    def _decode_s(self, rows: int, ctx_tokens: int) -> float:
        if rows == 0:
            return 0.0
        b = bucket_for(rows, self.buckets)
        kv = ctx_tokens * KV_S_PER_TOKEN
        return base_step_s(b) + kv if b is not None else EAGER_FACTOR * base_step_s(self.buckets[-1]) + kv

    def _match(self, prompt: tuple[int, ...]) -> int:
        hit = 0
        for h in block_hashes(prompt[: len(prompt) - 1], self.block_size):
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            hit += self.block_size
        return hit

    def _insert(self, tokens: tuple[int, ...]) -> None:
        for depth, h in enumerate(block_hashes(tokens, self.block_size), 1):
            self.cache[h] = depth
            self.cache.move_to_end(h)
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)

    def stats(self, now: float) -> dict:
        held = sum(-(-(len(s.prompt) + s.max_tokens) // self.block_size) for s in self.running)
        summary = [h for h, d in reversed(self.cache.items()) if is_summary_depth(d)][:MAX_PREFIX_HASHES]
        return ReplicaStats(
            captured_buckets=self.buckets, max_seq_len=8192, max_num_seqs=self.rows,
            running=len(self.running), free_slots=self.rows - len(self.running), queued=len(self.waiting),
            graphs=True, timestamp=now, block_size=self.block_size, total_blocks=self.cache_blocks,
            free_blocks=max(self.cache_blocks - held, 0),
            prefill_backlog_tokens=sum(len(s.prompt) - s.computed for s in self.running + self.waiting),
            decode_rows=sum(1 for s in self.running if s.prefilled),
            prefill_tokens_per_s=PREFILL_TOKENS_PER_S,
            decode_step_s={b: self._decode_s(b, b * MEASURED_CONTEXT) for b in self.buckets},
            mean_output_tokens=self.mean_output,
            min_remaining_steps=min((s.max_tokens - s.generated for s in self.running), default=0),
            prefix_hashes=tuple(summary)).to_dict()
