"""Scheduler: the synchronous continuous-batching step, token ids in, token ids out.

One `step()` = apply aborts -> admit waiting requests into free KV slots -> prefill up to
`prefill_chunk_tokens` prompt tokens across waiting prompts (eager, one packed forward) -> launch
one decode step for every running sequence (graph replay) -> read the *previous* step's tokens (its
one host wait, while this step runs on the GPU) -> token-level stops (EOS, stop ids, max_tokens,
max_seq_len) -> free finished slots.

The one-step lookahead hides the host's bookkeeping behind the GPU: a sequence's next input token
is taken on the device from the step in flight. The price: a sequence that stops on EOS has already
been launched once more; that row's token is dropped. Text (detokenisation, stop strings) is the
front end's job (replica/engine.py).

Thread model: `submit` and `abort` may be called from any thread; everything else runs on the one
thread (or process, replica/backends.py) that owns the model, the KV pool and the slot allocator.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch

from replica.sampling import sample
from replica.sampling_params import SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    slot: int = -1
    prefilled: int = 0                 # prompt tokens already in the KV pool
    output_ids: list[int] = field(default_factory=list)
    pending: int = 0                   # tokens launched on the device, not yet read back
    finished: bool = False

    def wants_decode(self, max_seq_len: int) -> bool:
        """Prefilled, running, and one more launched token stays within max_tokens and max_seq_len."""
        n = len(self.output_ids) + self.pending
        return (bool(self.output_ids) and not self.finished and n < self.params.max_tokens
                and len(self.prompt_ids) + n < max_seq_len)


@dataclass
class LaunchedStep:
    seqs: list[Sequence]
    step: object                       # replica.graphs.InFlight


@dataclass(frozen=True)
class Event:
    seq: Sequence
    token_ids: tuple[int, ...]
    finish_reason: Optional[str] = None   # "stop" | "length" | "abort"
    stopped_on_token: bool = False        # the last token is a stop/EOS token: keep it out of text


class Scheduler:
    """Owns the queues and the step; `runtime` (replica/runtime.py) owns the tensors."""

    def __init__(self, runtime, eos_token_ids, prefill_chunk_tokens: int):
        self.rt = runtime
        self.eos = frozenset(eos_token_ids)
        self.chunk = prefill_chunk_tokens
        self._lock = threading.Lock()
        self._incoming: collections.deque[Sequence] = collections.deque()
        self._aborts: set[str] = set()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[str, Sequence] = {}
        self.counters = collections.Counter()
        self.decode_steps: collections.Counter = collections.Counter()
        self.padded_rows: collections.Counter = collections.Counter()
        self._inflight: Optional[LaunchedStep] = None

    # -- any thread -----------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._lock:
            self._incoming.append(seq)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        return bool(self._incoming or self._aborts or self.waiting or self.running or self._inflight)

    # -- step thread ----------------------------------------------------------------------------
    def step(self) -> list[Event]:
        events: list[Event] = []
        self._drain_inbox(events)
        self._admit()
        self._prefill(events)
        self._decode(events)
        return events

    def _drain_inbox(self, events: list[Event]) -> None:
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        if not aborts:
            return
        for seq in [s for s in self.waiting if s.request_id in aborts]:
            self.waiting.remove(seq)
            self._finish(seq, (), "abort", events)
        for rid in aborts & self.running.keys():
            self._finish(self.running[rid], (), "abort", events)

    def _admit(self) -> None:
        while self.waiting and self.rt.slots.num_free:
            seq = self.waiting.popleft()
            seq.slot = self.rt.slots.allocate()
            self.running[seq.request_id] = seq

    def _prefill(self, events: list[Event]) -> None:
        """Up to `chunk` prompt tokens, across as many waiting prompts as fit, in one forward;
        sequences whose prompt is complete get their first token (one batched sample, one sync)."""
        budget, chunks, seqs = self.chunk, [], []
        for seq in [s for s in self.running.values() if not s.output_ids]:
            if budget <= 0:
                break
            n = min(budget, len(seq.prompt_ids) - seq.prefilled)
            chunks.append((seq.prompt_ids[seq.prefilled:seq.prefilled + n], seq.prefilled, seq.slot))
            seqs.append(seq)
            seq.prefilled += n
            budget -= n
        if not chunks:
            return
        logits = self.rt.prefill(chunks)                                  # [len(chunks), V]
        self.counters["prompt_tokens"] += self.chunk - budget
        done = [i for i, s in enumerate(seqs) if s.prefilled == len(s.prompt_ids)]
        if done:
            for i, tok in zip(done, self._first_tokens([seqs[i] for i in done], logits[done])):
                self._accept(seqs[i], tok, events)

    @staticmethod
    def _first_tokens(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        dev = logits.device
        col = lambda f, dtype: torch.tensor([f(s) for s in seqs], dtype=dtype, device=dev)
        toks = sample(logits, col(lambda s: s.params.temperature, torch.float32),
                      col(lambda s: s.params.top_k, torch.long), col(lambda s: s.params.top_p, torch.float32),
                      col(lambda s: s.seed, torch.long), torch.zeros(len(seqs), dtype=torch.long, device=dev))
        return toks.tolist()

    def _decode(self, events: list[Event]) -> None:
        """Launch this step, then collect the previous one while this one runs."""
        prev = self._inflight
        prev_row = {id(s): j for j, s in enumerate(prev.seqs)} if prev else {}
        seqs = [s for s in self.running.values() if s.wants_decode(self.rt.max_seq_len)]
        seqs = seqs[:self.rt.max_decode_rows]  # fallback="queue": never past the largest bucket
        self._inflight = None
        if seqs:
            rows = [self._row(s, prev_row) for s in seqs]
            step = self.rt.launch_decode(rows, any(s.params.temperature > 0 for s in seqs))
            for s in seqs:
                s.pending += 1
            self._inflight = LaunchedStep(seqs, step)
            self.decode_steps[(step.result.bucket, step.result.path)] += 1
            self.padded_rows[step.result.bucket] += step.result.padded
        if prev:
            for seq, tok in zip(prev.seqs, self.rt.collect_decode(prev.step)):
                seq.pending -= 1
                if not seq.finished:   # finished since launch (EOS one step earlier, or aborted)
                    self._accept(seq, tok, events)

    @staticmethod
    def _row(s: Sequence, prev_row: dict) -> tuple:
        """(token, position, slot, top_k, seed, step, temperature, top_p, src) for DecodeGraphs."""
        n = len(s.output_ids) + s.pending           # tokens generated incl. the one in flight
        position = len(s.prompt_ids) + n - 1        # where the fed token goes
        if s.pending:  # its input is the in-flight token, still on the device
            token, src = 0, prev_row[id(s)]
        else:
            token, src = s.output_ids[-1], -1
        p = s.params
        return (token, position, s.slot, p.top_k, s.seed, n, float(p.temperature), float(p.top_p), src)

    def _accept(self, seq: Sequence, tok: int, events: list[Event]) -> None:
        seq.output_ids.append(tok)
        self.counters["generated_tokens"] += 1
        p = seq.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos):
            return self._finish(seq, (tok,), "stop", events, stopped_on_token=True)
        if len(seq.output_ids) >= p.max_tokens or \
                len(seq.prompt_ids) + len(seq.output_ids) >= self.rt.max_seq_len:
            return self._finish(seq, (tok,), "length", events)
        events.append(Event(seq, (tok,)))

    def _finish(self, seq: Sequence, toks, reason: str, events: list[Event], stopped_on_token=False) -> None:
        seq.finished = True
        if seq.slot >= 0:
            self.rt.slots.release(seq.slot)
            seq.slot = -1
        self.running.pop(seq.request_id, None)
        self.counters["aborted_requests" if reason == "abort" else "finished_requests"] += 1
        events.append(Event(seq, tuple(toks), reason, stopped_on_token))

    def abort_all(self) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
        for seq in list(self.waiting) + list(self.running.values()):
            self._finish(seq, (), "abort", events)
        self.waiting.clear()
        self._inflight = None
        return events
