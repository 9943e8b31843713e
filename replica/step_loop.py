"""StepLoop: the engine core - runtime, scheduler and their stats - behind a message-sized API.

It speaks only picklable values (`SeqSpec` in, `EventRecord` lists and `EngineStats` out), so the
same object runs on a thread of the caller's process or alone in a child process
(replica/backends.py). Nothing here knows about asyncio or text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from replica.config import EngineConfig
from replica.core import Event, Scheduler, Sequence
from replica.runtime import ModelRuntime
from replica.sampling_params import SamplingParams
from replica.stats import EngineStats
from replica.tokenizer import load_tokenizer


@dataclass(frozen=True)
class SeqSpec:
    """A validated request, as the front end hands it to the core."""
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int


@dataclass(frozen=True)
class EventRecord:
    """`core.Event` without the Sequence object: what crosses a thread or process boundary."""
    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: Optional[str]
    stopped_on_token: bool


@dataclass(frozen=True)
class EngineInfo:
    """What the front end needs to validate requests, known once the core is built."""
    vocab_size: int
    max_seq_len: int


class StepLoop:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runtime = ModelRuntime(config)
        eos = set(load_tokenizer(config.model).eos_token_ids)
        gen_eos = getattr(self.runtime.hf_config, "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.scheduler = Scheduler(self.runtime, eos, config.prefill_chunk_tokens)
        self.info = EngineInfo(self.runtime.model.shape.vocab_size, config.max_seq_len)

    def submit(self, spec: SeqSpec) -> None:
        self.scheduler.submit(Sequence(spec.request_id, list(spec.prompt_ids), spec.params, spec.seed))

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[EventRecord]:
        return _records(self.scheduler.step())

    def abort_all(self) -> list[EventRecord]:
        return _records(self.scheduler.abort_all())

    def stats(self) -> EngineStats:
        sch, rt, c = self.scheduler, self.runtime, self.config
        return EngineStats(
            captured_buckets=rt.graphs.captured_buckets if rt.graphs.use_graphs else c.batch_buckets,
            graphs=rt.graphs.use_graphs, max_seq_len=c.max_seq_len, max_num_seqs=rt.slots.capacity,
            running=len(sch.running), free_slots=rt.slots.num_free,
            queued=len(sch.waiting) + len(sch._incoming), fallback=c.fallback,
            decode_steps=dict(sch.decode_steps), padded_rows=dict(sch.padded_rows),
            generated_tokens=sch.counters["generated_tokens"], prompt_tokens=sch.counters["prompt_tokens"],
            finished_requests=sch.counters["finished_requests"],
            aborted_requests=sch.counters["aborted_requests"], startup=rt.startup)


def _records(events: list[Event]) -> list[EventRecord]:
    return [EventRecord(e.seq.request_id, e.token_ids, e.finish_reason, e.stopped_on_token) for e in events]
