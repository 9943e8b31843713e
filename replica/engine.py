"""`Engine`: the public, asyncio-facing API over the step loop (contract: docs/engine-api.md).

The constructor builds the runtime (weights, KV pool, graphs) and starts one daemon thread that runs
`Scheduler.step()` whenever there is work. Each step's events are handed to the asyncio loop of each
request in one `call_soon_threadsafe` per loop, so the event loop (a Serve replica's) never blocks on
the GPU. `generate()` turns events into `GenerationChunk`s, does detokenisation and stop strings, and
aborts its request when the consumer stops early - the slot is freed before the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
import uuid
from collections import defaultdict
from typing import AsyncIterator

from replica.config import EngineConfig
from replica.core import Event, Scheduler, Sequence
from replica.detokenizer import IncrementalDetokenizer
from replica.runtime import ModelRuntime
from replica.sampling_params import GenerationChunk, GenerationRequest, InvalidRequestError
from replica.stats import EngineStats
from replica.tokenizer import load_tokenizer

log = logging.getLogger("replica")
STALL_SECONDS = 60.0


class EngineDeadError(RuntimeError):
    """The engine was shut down or its step loop failed; the request cannot run."""


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.runtime = ModelRuntime(config)
        self.model_name = config.model
        eos = set(self.tokenizer.eos_token_ids)
        gen_eos = getattr(self.runtime.hf_config, "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.scheduler = Scheduler(self.runtime, eos, config.prefill_chunk_tokens)
        self._seed_rng = random.Random(config.seed)
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._stopping = False
        self._error: BaseException | None = None
        self._last_step_end = time.monotonic()
        self._in_step_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name="graphserve-step", daemon=True)
        self._thread.start()

    # -- public API -----------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.chat_ids(messages)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        seq = self._make_sequence(request)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seq.sink = (loop, queue)
        detok = IncrementalDetokenizer(self.tokenizer, seq.params.stop)
        self._submit(seq)
        done = False
        try:
            while not done:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise EngineDeadError("the engine stopped while the request ran") from event
                chunk, done = self._to_chunk(seq, event, detok)
                if chunk is not None:
                    yield chunk
        finally:
            if not done:
                self.scheduler.abort(seq.request_id)
                self._notify()

    def stats(self) -> EngineStats:
        sch, rt = self.scheduler, self.runtime
        c = self.config
        return EngineStats(
            captured_buckets=rt.graphs.captured_buckets if rt.graphs.use_graphs else c.batch_buckets,
            graphs=rt.graphs.use_graphs, max_seq_len=c.max_seq_len, max_num_seqs=rt.slots.capacity,
            running=len(sch.running), free_slots=rt.slots.num_free,
            queued=len(sch.waiting) + len(sch._incoming), fallback=c.fallback,
            decode_steps=dict(sch.decode_steps), padded_rows=dict(sch.padded_rows),
            generated_tokens=sch.counters["generated_tokens"], prompt_tokens=sch.counters["prompt_tokens"],
            finished_requests=sch.counters["finished_requests"],
            aborted_requests=sch.counters["aborted_requests"], startup=rt.startup)

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"step loop failed: {self._error!r}") from self._error
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError("step loop is not running")
        since = self._in_step_since
        if since is not None and time.monotonic() - since > STALL_SECONDS:
            raise EngineDeadError(f"one engine step has run for over {STALL_SECONDS:.0f} s")

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- request plumbing -----------------------------------------------------------------------
    def _make_sequence(self, request: GenerationRequest) -> Sequence:
        if self._stopping or self._error is not None:
            raise EngineDeadError("the engine is not running")
        ids = list(request.prompt_token_ids) if request.prompt_token_ids is not None \
            else self.tokenizer.encode(request.prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        limit = self.config.max_seq_len - 1
        if len(ids) > limit:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; this model's maximum is {limit} "
                                      f"(max_seq_len {self.config.max_seq_len} minus one new token)")
        vocab = self.runtime.model.shape.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        seed = request.params.seed if request.params.seed is not None else self._seed_rng.getrandbits(62)
        rid = request.request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        return Sequence(rid, ids, request.params, seed)

    def _submit(self, seq: Sequence) -> None:
        self.scheduler.submit(seq)
        self._notify()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _to_chunk(self, seq: Sequence, event: Event, detok: IncrementalDetokenizer):
        """Returns (chunk or None, finished)."""
        text_ids = event.token_ids[:-1] if event.stopped_on_token else event.token_ids
        detok.add(text_ids)
        final = event.finish_reason is not None
        text, matched = (detok.flush_all(), None) if final else detok.take(final=False)
        reason = event.finish_reason
        if matched is not None:  # a stop string: end here, and tell the step loop to free the slot
            reason = "stop"
            self.scheduler.abort(seq.request_id)
            self._notify()
        detok.emitted_tokens += len(event.token_ids)  # not len(seq.output_ids): the step thread runs ahead
        chunk = GenerationChunk(seq.request_id, event.token_ids, text, reason,
                                prompt_tokens=len(seq.prompt_ids), completion_tokens=detok.emitted_tokens)
        return chunk, reason is not None

    # -- step thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self.scheduler.has_work():
                        self._wake.wait(timeout=1.0)
                    if self._stopping:
                        break
                self._in_step_since = time.monotonic()
                events = self.scheduler.step()
                self._in_step_since = None
                self._last_step_end = time.monotonic()
                self._deliver(events)
            self._deliver(self.scheduler.abort_all())
        except BaseException as e:  # noqa: BLE001 - the loop must report any failure to its waiters
            log.exception("engine step loop failed")
            self._error = e
            self._fail_all(e)

    def _deliver(self, events: list[Event]) -> None:
        by_loop: dict = defaultdict(list)
        for ev in events:
            loop, queue = ev.seq.sink
            by_loop[loop].append((queue, ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def _fail_all(self, error: BaseException) -> None:
        seqs = list(self.scheduler.running.values()) + list(self.scheduler.waiting) + \
            list(self.scheduler._incoming)
        self._deliver_error(seqs, error)

    def _deliver_error(self, seqs, error) -> None:
        for seq in seqs:
            loop, queue = seq.sink
            try:
                loop.call_soon_threadsafe(queue.put_nowait, error)
            except RuntimeError:
                pass


def _put_all(items) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)
