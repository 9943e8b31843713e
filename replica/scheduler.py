"""Scheduler: admission, KV blocks, the per-step token budget and preemption. Decides; runs nothing.

One `schedule()` builds the next `StepBatch` (replica/batch.py):
1. apply aborts;
2. decode rows: every admitted sequence whose next input is the last token it has (known, or
   still on the device from the step in flight), oldest first; a row that starts a new block gets
   one, and when none is free the youngest admitted sequence is preempted (its blocks freed, back
   to the waiting queue to be recomputed), so running decodes never deadlock on memory;
3. prefill chunks, up to the step's token budget (`step_token_budget` minus the decode rows, but
   at least a quarter of it, so prompts never starve): unfinished prompts first, then new
   admissions, oldest first. Admission takes a block-table row, the prompt's cached leading blocks
   (prefix cache, replica/blocks.py) and fresh blocks for the rest of its known tokens; it waits
   while that would leave less than a small watermark of blocks free.
`postprocess(batch, tokens, logprobs)` consumes the tokens of a step once the runner has read them
back (one step after its launch: the worker keeps one step in flight), applies stops and limits,
frees finished sequences, registers newly full blocks in the prefix cache, and returns `Event`s.
What the router reads of how rows free: `mean_output_tokens` (finished sequences, moving average)
and `min_remaining_steps()`.

Thread model: `submit` and `abort` may be called from any thread; everything else runs on the one
thread (or process) that owns the model runner.
"""
from __future__ import annotations

import bisect
import collections
import threading
from typing import Optional

from replica.batch import StepBatch
from replica.blocks import BlockPool
from replica.block_hash import ROOT
from replica.sampling_params import TokenLogprob
from replica.sequence import Event, Sequence, Status

OUTPUT_EMA = 1 / 32   # weight of the newest finished sequence in `mean_output_tokens`


class EngineOverloadedError(RuntimeError):
    """The engine's admission queue is full (EngineConfig.max_queued_requests)."""


class Scheduler:
    def __init__(self, pool: BlockPool, max_rows: int, max_decode_rows: int, max_seq_len: int,
                 step_token_budget: int, eos_token_ids, max_queued: Optional[int] = None):
        self.pool, self.bs = pool, pool.block_size
        self.max_rows, self.max_decode_rows = max_rows, max_decode_rows
        self.max_seq_len, self.budget = max_seq_len, step_token_budget
        self.eos = frozenset(eos_token_ids)
        self.max_queued = max_queued
        self.watermark = max(1, pool.usable_blocks // 100)
        self._lock = threading.Lock()
        self._incoming: collections.deque[Sequence] = collections.deque()
        self._aborts: set[str] = set()
        self._arrivals = 0
        self.waiting: list[Sequence] = []                 # sorted by arrival (preempted ones keep theirs)
        self.running: dict[str, Sequence] = {}            # admission order == dict order
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._out_row: dict[int, int] = {}                # id(seq) -> output row in the step in flight
        self.counters = collections.Counter()
        self.mean_output_tokens = 0.0                     # moving average over finished sequences

    # -- any thread -----------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if self.max_queued is not None and len(self._incoming) + len(self.waiting) >= self.max_queued:
                raise EngineOverloadedError(f"the engine's queue is full ({self.max_queued} requests wait)")
            self._incoming.append(seq)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        return bool(self._incoming or self._aborts or self.waiting or self.running)

    @property
    def queued(self) -> int:
        return len(self.waiting) + len(self._incoming)

    # -- the step -------------------------------------------------------------------------------
    def schedule(self, events: list[Event]) -> StepBatch:
        """The next step's batch (empty when nothing can run); abort events go to `events`."""
        self._drain_inbox(events)
        batch = StepBatch()
        self._plan_decode(batch)
        budget = max(self.budget - len(batch.decode), self.budget // 4)
        budget = self._plan_chunks(batch, list(self.running.values()), budget)
        while budget > 0 and self.waiting and self._free_rows:
            seq = next((s for s in self.waiting if s.pending == 0), None)
            if seq is None or not self._admit(seq, batch):
                break
            budget = self._plan_chunks(batch, [seq], budget)
        for seq in batch.chunks.seqs:
            self._register_full_blocks(seq)
        self._out_row = {id(s): j for j, s in enumerate(batch.sampled)}
        return batch

    def _plan_decode(self, batch: StepBatch) -> None:
        """A row for every sequence whose next input is its last token (known, or in flight:
        `num_computed == num_tokens + pending - 1`) and whose next token stays within max_tokens and
        max_seq_len. Inlined checks and appends: this loop runs for every row of every step
        (~1 us per row on a dev CPU, the engine's largest host cost at 512 rows)."""
        rows, bs, limit, cap = batch.decode, self.bs, self.max_seq_len, self.max_decode_rows
        out_row, running = self._out_row, Status.RUNNING
        add_seq, add_tok, add_src, add_pos = rows.seqs.append, rows.tokens.append, rows.src.append, rows.positions.append
        add_row, add_slot, add_step = rows.table_rows.append, rows.slots.append, rows.steps.append
        for seq in list(self.running.values()):          # admission order
            if len(rows.seqs) >= cap:
                break
            p, pending, n = seq.num_computed, seq.pending, seq.num_tokens
            generated = len(seq.output_ids) + pending
            if (p != n + pending - 1 or generated >= seq.params.max_tokens or n + pending >= limit
                    or seq.status is not running):
                continue
            table = seq.block_table
            if p // bs == len(table) and not self._grow(seq, rows.seqs):
                continue                                   # seq itself was preempted
            add_seq(seq)
            if pending:
                add_tok(0)
                add_src(out_row[id(seq)])
            else:
                add_tok(seq.token_at(p))
                add_src(-1)
            add_pos(p)
            add_row(seq.row)
            add_slot(table[p // bs] * bs + p % bs)
            add_step(generated)
            seq.num_computed = p + 1
            seq.pending = pending + 1

    def _grow(self, seq: Sequence, planned: list[Sequence]) -> bool:
        """One more block for `seq`, preempting the youngest admitted sequences not yet in this
        step (`planned`) until one is free. False when `seq` itself had to go."""
        while self.pool.num_free == 0:
            taken = {id(s) for s in planned}
            others = [s for s in self.running.values() if id(s) not in taken and s is not seq]
            victim = max(others, key=lambda s: s.arrival) if others else seq
            if victim.arrival < seq.arrival:
                victim = seq                               # never evict an older sequence for a younger
            self._preempt(victim)
            if victim is seq:
                return False
        seq.block_table += self.pool.allocate(1)
        return True

    def _plan_chunks(self, batch: StepBatch, seqs: list[Sequence], budget: int) -> int:
        for seq in seqs:
            if budget <= 0:
                break
            known = seq.num_tokens
            if seq.status is not Status.RUNNING or seq.pending or known - seq.num_computed < 1:
                continue
            start = seq.num_computed
            end = min(known, start + budget)
            sample = end == known
            batch.chunks.add(seq, start, end, self.bs, sample)
            seq.num_computed = end
            if sample:
                seq.pending += 1
            budget -= end - start
        return budget

    def _admit(self, seq: Sequence, batch: StepBatch) -> bool:
        """Give `seq` a row, its cached leading blocks and fresh blocks for its other known tokens;
        False (nothing changed) when the pool cannot hold it above the watermark."""
        n = seq.num_tokens
        hits, hashes = self.pool.match(seq.prompt_ids + seq.output_ids, n - 1)  # recompute >= 1 token
        need = -(-n // self.bs) - len(hits)
        revived = sum(1 for b in hits if self.pool._ref[b] == 0)   # cached but idle: leave the free count
        if need + revived + self.watermark > self.pool.num_free and self.running:
            return False
        if need + revived > self.pool.num_free:
            return False
        self.pool.acquire(hits)
        seq.block_table = hits + self.pool.allocate(need)
        seq.num_computed, seq.num_registered = len(hits) * self.bs, len(hits)
        seq.last_hash = hashes[-1] if hashes else ROOT
        if not seq.preemptions:
            seq.cached_tokens = len(hits) * self.bs
            self.pool.note_lookup(len(seq.prompt_ids), seq.cached_tokens)
            self.counters["prompt_tokens"] += len(seq.prompt_ids)
        seq.row = self._free_rows.pop()
        seq.status = Status.RUNNING
        self.waiting.remove(seq)
        self.running[seq.request_id] = seq
        batch.admitted.append(seq)
        batch.table_writes += [(seq.row, i, b) for i, b in enumerate(hits)]
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and row; it waits again and recomputes its known tokens. A token it
        has in flight still arrives (postprocess appends it) before it can be readmitted."""
        self._release(seq)
        del self.running[seq.request_id]
        seq.status = Status.WAITING
        seq.num_computed = seq.num_registered = 0
        seq.last_hash = ROOT
        seq.preemptions += 1
        self.counters["preemptions"] += 1
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.release(seq.block_table)
            seq.block_table = []
        if seq.row >= 0:
            self._free_rows.append(seq.row)
            seq.row = -1

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Index the blocks whose tokens are known and whose KV has been launched."""
        full = min(seq.num_computed, seq.num_tokens) // self.bs
        for i in range(seq.num_registered, full):
            seq.last_hash = self.pool.register(seq.block_table[i], seq.last_hash,
                                               seq.tokens(i * self.bs, (i + 1) * self.bs), i + 1)
        seq.num_registered = max(seq.num_registered, full)

    # -- results --------------------------------------------------------------------------------
    def postprocess(self, batch: StepBatch, tokens: list[int],
                    logprobs: Optional[list[TokenLogprob]] = None) -> list[Event]:
        """Accept the tokens of a step (one per sampled row, in output-row order). Per row:
        append, check stops and limits, emit an event; inlined, like `_plan_decode`."""
        events: list[Event] = []
        emit, bs, limit, eos = events.append, self.bs, self.max_seq_len, self.eos
        finished, accepted = Status.FINISHED, 0
        for j, (seq, tok) in enumerate(zip(batch.sampled, tokens)):
            seq.pending -= 1
            if seq.status is finished:             # stopped or aborted since the launch: drop it
                continue
            accepted += 1
            p = seq.params
            lp = (logprobs[j],) if logprobs is not None and p.logprobs is not None else None
            seq.output_ids.append(tok)
            seq.num_tokens += 1
            out = len(seq.output_ids)
            cached = seq.cached_tokens if out == 1 else 0
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in eos):
                self._finish(seq, (tok,), "stop", events, lp, stopped_on_token=True, cached=cached)
            elif out >= p.max_tokens or seq.num_tokens >= limit:
                self._finish(seq, (tok,), "length", events, lp, cached=cached)
            else:
                emit(Event(seq.request_id, (tok,), None, False, lp, cached))
                if min(seq.num_computed, seq.num_tokens) // bs > seq.num_registered:
                    self._register_full_blocks(seq)
        self.counters["generated_tokens"] += accepted
        return events

    def _finish(self, seq: Sequence, toks, reason: str, events: list[Event], lp=None,
                stopped_on_token: bool = False, cached: int = 0) -> None:
        if seq.status is Status.RUNNING:
            self._release(seq)
            del self.running[seq.request_id]
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        if reason == "abort":
            self.counters["aborted_requests"] += 1
        else:
            self.counters["finished_requests"] += 1
            n, m = len(seq.output_ids), self.mean_output_tokens
            self.mean_output_tokens = m + (n - m) * OUTPUT_EMA if m else float(n)
        events.append(Event(seq.request_id, tuple(toks), reason, stopped_on_token, lp, cached))

    def _drain_inbox(self, events: list[Event]) -> None:
        with self._lock:
            for seq in self._incoming:
                seq.arrival = self._arrivals
                self._arrivals += 1
                self.waiting.append(seq)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            seq = self.running.get(rid) or next((s for s in self.waiting if s.request_id == rid), None)
            if seq is not None:
                self._finish(seq, (), "abort", events)

    def abort_all(self) -> list[Event]:
        events: list[Event] = []
        self._drain_inbox(events)
        for seq in list(self.waiting) + list(self.running.values()):
            self._finish(seq, (), "abort", events)
        return events

    # -- reporting ------------------------------------------------------------------------------
    def backlog_tokens(self) -> int:
        """Known tokens without KV yet: unfinished prompts/recomputes and the waiting queue."""
        running = sum(s.num_tokens - s.num_computed for s in self.running.values()
                      if s.num_computed < s.num_tokens - 1)
        return running + sum(s.num_tokens for s in self.waiting) + sum(len(s.prompt_ids) for s in self._incoming)

    def min_remaining_steps(self) -> int:
        """Decode steps until the first running sequence reaches its max_tokens (or max_seq_len):
        a lower bound on when a row frees, 0 with nothing running. O(running)."""
        return min((min(s.params.max_tokens - s.generated, self.max_seq_len - s.num_tokens)
                    for s in self.running.values()), default=0)

    def decode_rows(self) -> int:
        return sum(1 for s in self.running.values() if s.num_computed >= s.num_tokens - 1)

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)
