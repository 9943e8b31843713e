"""`Sequence` (one request's state in the scheduler) and `Event` (what a step tells the front end).

Both are plain picklable dataclasses: the front end builds a fresh `Sequence` from a validated
request and submits it (across a process boundary on CUDA); the scheduler mutates its own copy.
An `Event` carries only ids and numbers back.

Token positions: a sequence's tokens are `prompt_ids + output_ids`; token i sits at position i of
its KV. `num_computed` counts the tokens whose KV has been written or scheduled to be written (prefix
cache hits + prefilled chunks + decoded inputs); the next token fed is at position `num_computed`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from replica.sampling_params import SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"      # queued for admission (new, or preempted for recompute)
    RUNNING = "running"      # admitted: holds a table row and KV blocks
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: int = 0                     # submission order (the scheduler's clock): oldest first
    arrived_s: float = 0.0               # when it was submitted (Scheduler.clock, seconds)
    # -- scheduler state --
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    row: int = -1                        # block-table / sampling-table row while RUNNING
    num_computed: int = 0                # tokens whose KV is written or being written
    num_registered: int = 0              # leading full blocks already in the prefix cache index
    last_hash: int = 0                   # chained hash of those blocks
    cached_tokens: int = 0               # prompt tokens served by the prefix cache at first admission
    pending: int = 0                     # tokens launched on the device, not yet read back
    preemptions: int = 0
    num_tokens: int = -1                 # len(prompt_ids) + len(output_ids), kept by Scheduler.postprocess
    # -- set once by the scheduler at submission, read for every token (Scheduler.postprocess) --
    stop_ids: frozenset = frozenset()    # token ids that end it: stop_token_ids, plus EOS unless ignored
    max_output: int = 0                  # output tokens it may reach: max_tokens, capped by max_seq_len

    def __post_init__(self) -> None:
        self.num_tokens = len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]

    @property
    def generated(self) -> int:
        """Tokens generated, counting the ones in flight."""
        return len(self.output_ids) + self.pending


class Event(NamedTuple):
    """New tokens of one request, and whether it ended. The front end turns events into chunks.
    A NamedTuple: hundreds cross the process boundary every step, and tuples pickle fastest."""
    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: Optional[str] = None     # "stop" | "length" | "abort" | None (still running)
    stopped_on_token: bool = False          # the last token is EOS/a stop id: keep it out of the text
    logprobs: Optional[tuple[TokenLogprob, ...]] = None
    cached_tokens: int = 0


@dataclass
class StepEvents:
    """One step's events, packed: request `ids[i]` got token `tokens[i]` and still runs (nearly
    every event of a step: two columns are cheap to build and ~20x cheaper to pickle than as many
    `Event`s); every other event (finished, aborted, with logprobs or cached tokens) whole in
    `other`. A step has at most one event per request, so the order between the groups carries
    nothing. Iterating yields `Event`s."""
    ids: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    other: list[Event] = field(default_factory=list)

    def expand(self) -> list[Event]:
        return [Event(r, (t,)) for r, t in zip(self.ids, self.tokens)] + self.other

    def __iter__(self):
        return iter(self.expand())

    def __len__(self) -> int:
        return len(self.ids) + len(self.other)
