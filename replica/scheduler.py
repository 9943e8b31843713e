"""Scheduler: admission, KV blocks, the per-step token budget and preemption. Decides; runs nothing.

One `schedule()` builds the next `StepBatch` (replica/batch.py):
1. apply aborts;
2. decode rows: every admitted sequence whose next input is the last token it has (known, or
   still on the device from the step in flight), oldest first; a row that starts a new block gets
   one, and when none is free the youngest admitted sequence is preempted (its blocks freed, back
   to the waiting queue to be recomputed), so running decodes never deadlock on memory;
3. prefill chunks, up to the step's token budget (`step_token_budget` minus the decode rows, but
   at least a quarter of it, so prompts never starve): unfinished prompts first, then new
   admissions, in `admission_order` (replica/admission.py: most output left first among those
   that arrived within `window_s` of the oldest waiting one; 0: oldest first). Admission takes a
   block-table row, the prompt's cached leading blocks (prefix cache, replica/blocks.py) and fresh
   blocks for the rest of its known tokens; it waits while that would leave less than a small
   watermark of blocks free.
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
import time
from typing import Optional

import numpy as np

from replica.admission import admission_order
from replica.batch import COLUMNS, DecodeRows, StepBatch
from replica.blocks import BlockPool
from replica.block_hash import ROOT
from replica.sampling_params import TokenLogprob
from replica.sequence import Event, Sequence, Status, StepEvents
from replica.steady_decode import LOGPROBS, PLAIN_GREEDY, POSITIONS, SLOTS, advance, row_params

OUTPUT_EMA = 1 / 32   # weight of the newest finished sequence in `mean_output_tokens`


class EngineOverloadedError(RuntimeError):
    """The engine's admission queue is full (EngineConfig.max_queued_requests)."""


class Scheduler:
    def __init__(self, pool: BlockPool, max_rows: int, max_decode_rows: int, max_seq_len: int,
                 step_token_budget: int, eos_token_ids, max_queued: Optional[int] = None,
                 window_s: float = 0.0, clock=time.monotonic):
        self.pool, self.bs = pool, pool.block_size
        self.max_rows, self.max_decode_rows = max_rows, max_decode_rows
        self.max_seq_len, self.budget = max_seq_len, step_token_budget
        self.eos = frozenset(eos_token_ids)
        self.max_queued, self.window_s, self.clock = max_queued, window_s, clock
        self.watermark = max(1, pool.usable_blocks // 100)
        self._lock = threading.Lock()
        self._incoming: collections.deque[Sequence] = collections.deque()
        self._aborts: set[str] = set()
        self._arrivals = 0
        self.waiting: list[Sequence] = []                 # sorted by arrival (preempted ones keep theirs)
        self.running: dict[str, Sequence] = {}            # admission order == dict order
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._in_flight: list[Sequence] = []              # sequences of the last batch's output rows
        self._roster = 0                                  # bumped whenever `running` changes
        # the last batch if the next may repeat it: (batch, roster, its rows' params); _repeat_decode
        self._repeatable: Optional[tuple[StepBatch, int, np.ndarray]] = None
        self.counters = collections.Counter()
        self.mean_output_tokens = 0.0                     # moving average over finished sequences

    # -- any thread -----------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if self.max_queued is not None and len(self._incoming) + len(self.waiting) >= self.max_queued:
                raise EngineOverloadedError(f"the engine's queue is full ({self.max_queued} requests wait)")
            seq.arrived_s = self.clock()
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
        batch = self._repeat_decode() or self._plan(StepBatch())
        self._in_flight = batch.sampled
        return batch

    def _plan(self, batch: StepBatch) -> StepBatch:
        """The general case: decode rows, then prompt chunks and admissions up to the budget."""
        self._plan_decode(batch)
        budget = max(self.budget - len(batch.decode), self.budget // 4)
        budget = self._plan_chunks(batch, list(self.running.values()), budget)
        if budget > 0 and self._free_rows:
            for seq in admission_order(self.waiting, self.window_s):
                if not self._admit(seq, batch):
                    break
                budget = self._plan_chunks(batch, [seq], budget)
                if budget <= 0 or not self._free_rows:
                    break
        for seq in batch.chunks.seqs:
            self._register_full_blocks(seq)
        sampled = batch.sampled
        batch.greedy = all(s.params.plain_greedy for s in sampled)
        batch.logprobs = any(s.params.logprobs is not None for s in sampled)
        repeatable = (batch.decode.seqs and not batch.mixed and not batch.admitted
                      and len(batch.decode) == len(self.running))
        self._repeatable = (batch, self._roster, row_params(batch.decode.seqs)) if repeatable else None
        return batch

    def _repeat_decode(self) -> Optional[StepBatch]:
        """The steady state without the per-row plan: when the last batch decoded every running
        sequence that could decode, nothing has joined since, and nothing can be admitted, the
        next batch is the last one's rows one position on, less the rows that have left
        (replica/steady_decode.py). Only rows that enter a new block touch the pool. None where
        the general plan is needed (`_plan`): fewer free blocks than rows entering a block
        (preemption), no row left, or a waiting sequence and a free row."""
        if self._repeatable is None or (self.waiting and self._free_rows):
            return None
        prev, roster, params = self._repeatable
        nxt = advance(prev.decode, params, self.max_seq_len, check_status=roster != self._roster)
        if nxt is None:
            return None
        seqs, cols, params = nxt
        positions, slots, bs = cols[POSITIONS], cols[SLOTS], self.bs
        entering = np.flatnonzero(positions % bs == 0)
        if len(entering) > self.pool.num_free:
            return None
        for j in entering.tolist():
            seq, block = seqs[j], int(positions[j]) // bs
            if block == len(seq.block_table):
                self._grow(seq, seqs)                      # a free block is there: no preemption
            slots[j] = seq.block_table[block] * bs
        for seq in seqs:
            seq.num_computed += 1
            seq.pending += 1
        batch = StepBatch(DecodeRows(seqs, cols), greedy=bool(params[PLAIN_GREEDY].all()),
                          logprobs=bool(params[LOGPROBS].any()))
        self._repeatable = (batch, self._roster, params)
        return batch

    def _plan_decode(self, batch: StepBatch) -> None:
        """A row for every sequence whose next input is its last token (known, or in flight:
        `num_computed == num_tokens + pending - 1`) and whose next token stays within max_tokens and
        max_seq_len. Inlined checks and appends: this loop runs for every row of every step that
        `_repeat_decode` does not cover (~1 us per row on a dev CPU)."""
        bs, limit, cap = self.bs, self.max_seq_len, self.max_decode_rows
        out_row = {id(s): j for j, s in enumerate(self._in_flight)}
        running = Status.RUNNING
        seqs: list[Sequence] = []
        toks: list[int] = []
        srcs: list[int] = []
        poss: list[int] = []
        rows: list[int] = []
        slots: list[int] = []
        steps: list[int] = []
        for seq in list(self.running.values()):          # admission order
            if len(seqs) >= cap:
                break
            p, pending, n = seq.num_computed, seq.pending, seq.num_tokens
            generated = len(seq.output_ids) + pending
            if (p != n + pending - 1 or generated >= seq.params.max_tokens or n + pending >= limit
                    or seq.status is not running):
                continue
            table = seq.block_table
            if p // bs == len(table) and not self._grow(seq, seqs):
                continue                                   # seq itself was preempted
            seqs.append(seq)
            if pending:
                toks.append(0)
                srcs.append(out_row[id(seq)])
            else:
                toks.append(seq.token_at(p))
                srcs.append(-1)
            poss.append(p)
            rows.append(seq.row)
            slots.append(table[p // bs] * bs + p % bs)
            steps.append(generated)
            seq.num_computed = p + 1
            seq.pending = pending + 1
        cols = np.array([toks, srcs, poss, rows, slots, steps], dtype=np.int64).reshape(len(COLUMNS), -1)
        batch.decode = DecodeRows(seqs, cols)

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
        self._roster += 1
        batch.admitted.append(seq)
        batch.table_writes += [(seq.row, i, b) for i, b in enumerate(hits)]
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and row; it waits again and recomputes its known tokens. A token it
        has in flight still arrives (postprocess appends it) before it can be readmitted."""
        self._release(seq)
        del self.running[seq.request_id]
        self._roster += 1
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
                    logprobs: Optional[list[TokenLogprob]] = None,
                    events: Optional[StepEvents] = None) -> StepEvents:
        """Accept the tokens of a step (one per sampled row, in output-row order): append each,
        check stops and limits, and add its event to `events` (a new one if None), which is
        returned. The common row (no stop, no limit, no logprobs, not a first token served from
        the prefix cache) costs a few attribute updates and two appends."""
        if self._repeatable is not None and self._repeatable[0] is batch:
            self._repeatable = None     # its rows' tokens are known now, not in flight: src is wrong
        ev = events if events is not None else StepEvents()
        ids, toks = ev.ids, ev.tokens
        bs, finished, accepted = self.bs, Status.FINISHED, 0
        for j, (seq, tok) in enumerate(zip(batch.sampled, tokens)):
            seq.pending -= 1
            if seq.status is finished:             # stopped or aborted since the launch: drop it
                continue
            accepted += 1
            out = seq.output_ids
            out.append(tok)
            seq.num_tokens += 1
            n = len(out)
            if (tok in seq.stop_ids or n >= seq.max_output or (n == 1 and seq.cached_tokens)
                    or (logprobs is not None and seq.params.logprobs is not None)):
                lp = (logprobs[j],) if logprobs is not None and seq.params.logprobs is not None else None
                if self._end_or_emit(seq, tok, lp, ev.other):
                    continue
            else:
                ids.append(seq.request_id)
                toks.append(tok)
            if min(seq.num_computed, seq.num_tokens) // bs > seq.num_registered:
                self._register_full_blocks(seq)
        self.counters["generated_tokens"] += accepted
        return ev

    def _end_or_emit(self, seq: Sequence, tok: int, lp, events: list[Event]) -> bool:
        """The uncommon row of `postprocess` (its token is already appended): finish it on a stop
        token or a limit (True), or emit its event whole: logprobs, or the cached-prompt count
        that rides on a first token (False)."""
        cached = seq.cached_tokens if len(seq.output_ids) == 1 else 0
        if tok in seq.stop_ids:
            self._finish(seq, (tok,), "stop", events, lp, stopped_on_token=True, cached=cached)
        elif len(seq.output_ids) >= seq.max_output:
            self._finish(seq, (tok,), "length", events, lp, cached=cached)
        else:
            events.append(Event(seq.request_id, (tok,), None, False, lp, cached))
            return False
        return True

    def _finish(self, seq: Sequence, toks, reason: str, events: list[Event], lp=None,
                stopped_on_token: bool = False, cached: int = 0) -> None:
        if seq.status is Status.RUNNING:
            self._release(seq)
            del self.running[seq.request_id]
            self._roster += 1
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
                p = seq.params
                seq.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos)
                seq.max_output = min(p.max_tokens, self.max_seq_len - len(seq.prompt_ids))
                self.waiting.append(seq)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            seq = self.running.get(rid) or next((s for s in self.waiting if s.request_id == rid), None)
            if seq is not None:
                self._finish(seq, (), "abort", events)

    def abort_all(self) -> StepEvents:
        events = StepEvents()
        self._drain_inbox(events.other)
        for seq in list(self.waiting) + list(self.running.values()):
            self._finish(seq, (), "abort", events.other)
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
