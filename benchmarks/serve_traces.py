"""serve_load's workloads (issue 10): four seeded traces, each drawn as a burst or as an open loop.

Traces (GPU sizes; `TRACES["cpu"]` holds the CPU smoke test's, a few times smaller):
  mix    today's mix (issue 3): interactive requests over HTTP streaming, prompt U[64,512] tokens,
         output U[32,128]; batch jobs through the ingress handle, U[8,64] prompts of U[128,512],
         output U[64,128]; arrivals 8 interactive : 1 batch job (issue 3's 2/s : 0.25/s).
  heavy  long prompts and outputs: interactive prompt U[1024,2048], output U[256,512]; batch jobs
         of U[4,16] prompts of U[1024,2048], output U[256,512]; arrivals 4 : 1.
  chat   multi-turn conversations through the ingress handle (its stream returns token ids): turn
         1 = [a system prefix] + a first user message U[128,512]; each later turn resends the
         previous turn's prompt + the model's output token ids + a new user message U[32,128];
         4 turns, output U[24,96] each, no think time. 4 system prefixes of U[256,1024] tokens per
         seed; a conversation uses one of them with probability 3/4 (shared prefixes), else none.
  chat-long  the same conversations over a private context each (a document or a long earlier
         session: U[1536,3072] tokens after the system prefix, never shared between
         conversations), first message U[64,256], later messages U[32,128], output U[32,128]. Where
         a turn lands decides whether its history is prefilled again (~2-4k tokens, 50-100 ms of
         8B compute): the shape prefix affinity exists for. `chat` is its short-history control.
A burst puts `burst` jobs of the trace at t=0 (mix 12 batch jobs + 48 interactive, heavy 4 + 32,
chat 160 conversations, chat-long 64; x --burst-scale): a few seconds of work for 2 llama-8b
replicas, which it must saturate to measure capacity. A conversation's turns run one after another,
so a chat burst needs many conversations: at 48, both routers ran at the turn chain's pace (two
H200s mostly idle, 1.7k tokens/s), not the GPUs'. chat-long's are fewer, as each first turn
prefills ~3k tokens (64 x 3k = ~2.5 s of 8B compute on two H200s). An open
loop draws Poisson arrivals over a window at given rates (interactive, batch jobs, conversations
per second). Prompts are random byte tokens (valid in every vocabulary); greedy, ignore_eos, so
every sequence runs its full max_tokens. Every draw is fixed by (trace, seed, phase), so both
routers get identical jobs. Pure Python: no Ray, no torch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

Range = tuple[int, int]


@dataclass(frozen=True)
class Job:
    kind: str                                   # "interactive" (HTTP) | "batch" | "chat" (handle)
    at: float                                   # arrival offset from the phase start, seconds
    prompts: tuple[tuple[int, ...], ...]        # chat: the first turn's prompt only
    max_tokens: int                             # per sequence; chat: the first turn's
    turns: tuple[tuple[tuple[int, ...], int], ...] = ()   # chat: (user tokens, max_tokens), turns 2..

    @property
    def sequences(self) -> int:
        return len(self.prompts) + len(self.turns)

    @property
    def output_tokens(self) -> int:
        return len(self.prompts) * self.max_tokens + sum(m for _, m in self.turns)


@dataclass(frozen=True)
class Trace:
    name: str
    interactive_prompt: Range = (0, 0)
    interactive_output: Range = (0, 0)
    batch_size: Range = (0, 0)
    batch_prompt: Range = (0, 0)
    batch_output: Range = (0, 0)
    interactive_share: float = 0.0              # of open-loop arrivals (mix, heavy)
    burst: tuple[int, int] = (0, 0)             # (batch jobs, interactive) or (conversations, 0)
    chat: Optional["Chat"] = None


@dataclass(frozen=True)
class Chat:
    system: Range                 # system prefix tokens
    systems: int                  # distinct system prefixes per seed
    shared: float                 # probability that a conversation uses one
    first: Range                  # first user message tokens
    user: Range                   # later user messages
    output: Range                 # tokens per turn
    turns: int
    context: Range = (0, 0)       # private tokens per conversation, after the system prefix


TRACES: dict[str, dict[str, Trace]] = {
    "gpu": {
        "mix": Trace("mix", (64, 512), (32, 128), (8, 64), (128, 512), (64, 128), 8 / 9, (12, 48)),
        "heavy": Trace("heavy", (1024, 2048), (256, 512), (4, 16), (1024, 2048), (256, 512), 4 / 5, (4, 32)),
        "chat": Trace("chat", burst=(160, 0), chat=Chat((256, 1024), 4, 0.75, (128, 512), (32, 128), (24, 96), 4)),
        "chat-long": Trace("chat-long", burst=(64, 0), chat=Chat((256, 1024), 4, 0.75, (64, 256), (32, 128),
                                                                 (32, 128), 4, context=(1536, 3072))),
    },
    "cpu": {
        "mix": Trace("mix", (16, 64), (4, 12), (4, 16), (16, 64), (4, 12), 8 / 9, (3, 8)),
        "heavy": Trace("heavy", (128, 256), (16, 32), (2, 6), (128, 256), (16, 32), 4 / 5, (1, 4)),
        "chat": Trace("chat", burst=(8, 0), chat=Chat((32, 96), 2, 0.75, (16, 64), (8, 24), (4, 12), 4)),
        "chat-long": Trace("chat-long", burst=(8, 0), chat=Chat((32, 96), 2, 0.75, (16, 32), (8, 24), (4, 12), 4,
                                                                context=(96, 192))),
    },
}


def longest_sequence(t: Trace) -> int:
    """Tokens the longest sequence of the trace can reach (prompt + output): must fit max_seq_len."""
    if t.chat:
        c = t.chat
        return c.system[1] + c.context[1] + c.first[1] + (c.turns - 1) * c.user[1] + c.turns * c.output[1]
    return max(t.interactive_prompt[1] + t.interactive_output[1], t.batch_prompt[1] + t.batch_output[1])


def _mean(r: Range) -> float:
    return (r[0] + r[1]) / 2


def mean_output(t: Trace, kind: str) -> float:
    """Expected output tokens of one job of `kind` (interactive | batch | chat)."""
    if kind == "chat":
        return t.chat.turns * _mean(t.chat.output)
    if kind == "interactive":
        return _mean(t.interactive_output)
    return _mean(t.batch_size) * _mean(t.batch_output)


def rates_for(t: Trace, tokens_per_s: float, http_cap: float, min_jobs_per_s: float = 0.0) -> dict:
    """Arrival rates (jobs/s per kind) that offer `tokens_per_s` output tokens per second in the
    trace's proportions; interactive HTTP requests capped at `http_cap`/s (batch jobs carry the
    rest, so the offered tokens stay); at least `min_jobs_per_s` jobs/s in all (`floored`: a
    capacity measured on a burst that spent its time prefilling must not leave a phase empty)."""
    if t.chat:
        per_job = mean_output(t, "chat")
        tokens_per_s = max(tokens_per_s, min_jobs_per_s * per_job)
        return {"chat": tokens_per_s / per_job, "offered_tokens_per_s": tokens_per_s,
                "floored": tokens_per_s == min_jobs_per_s * per_job}
    p = t.interactive_share
    per_job = p * mean_output(t, "interactive") + (1 - p) * mean_output(t, "batch")
    floored = tokens_per_s < min_jobs_per_s * per_job
    tokens_per_s = max(tokens_per_s, min_jobs_per_s * per_job)
    inter = min(p * tokens_per_s / per_job, http_cap)
    batch = max(tokens_per_s - inter * mean_output(t, "interactive"), 0.0) / mean_output(t, "batch")
    return {"interactive": inter, "batch": batch, "offered_tokens_per_s": tokens_per_s,
            "http_capped": inter < p * tokens_per_s / per_job, "floored": floored}


@dataclass
class Draw:
    """Random jobs of one trace, one seed, one phase (its own stream), sharing the seed's system
    prefixes across the seed's phases."""
    trace: Trace
    seed: int
    phase: str
    rng: random.Random = field(init=False)
    systems: list = field(init=False)

    def __post_init__(self):
        sys_rng = random.Random(f"{self.trace.name}/{self.seed}/systems")
        c = self.trace.chat
        self.systems = [_tokens(sys_rng, sys_rng.randint(*c.system)) for _ in range(c.systems)] if c else []
        self.rng = random.Random(f"{self.trace.name}/{self.seed}/{self.phase}")

    def job(self, kind: str, at: float) -> Job:
        t, rng = self.trace, self.rng
        if kind == "interactive":
            return Job(kind, at, (_tokens(rng, rng.randint(*t.interactive_prompt)),),
                       rng.randint(*t.interactive_output))
        if kind == "batch":
            n = rng.randint(*t.batch_size)
            return Job(kind, at, tuple(_tokens(rng, rng.randint(*t.batch_prompt)) for _ in range(n)),
                       rng.randint(*t.batch_output))
        c = t.chat
        system = self.systems[rng.randrange(len(self.systems))] if rng.random() < c.shared else ()
        context = _tokens(rng, rng.randint(*c.context)) if c.context[1] else ()
        first = system + context + _tokens(rng, rng.randint(*c.first))
        later = tuple((_tokens(rng, rng.randint(*c.user)), rng.randint(*c.output)) for _ in range(c.turns - 1))
        return Job("chat", at, (first,), rng.randint(*c.output), later)


def _tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randbytes(n))


def burst(t: Trace, seed: int, scale: float = 1.0) -> list[Job]:
    """The trace's burst, all at t=0: batch jobs first, then interactive requests (or conversations)."""
    d = Draw(t, seed, "burst")
    a, b = (max(1, round(x * scale)) if x else 0 for x in t.burst)
    if t.chat:
        return [d.job("chat", 0.0) for _ in range(a)]
    return [d.job("batch", 0.0) for _ in range(a)] + [d.job("interactive", 0.0) for _ in range(b)]


def open_loop(t: Trace, seed: int, phase: str, rates: dict, window_s: float) -> list[Job]:
    """Independent Poisson arrivals per kind over [0, window_s) at `rates` (jobs/s), by time."""
    d = Draw(t, seed, phase)
    jobs = []
    for kind in ("interactive", "batch", "chat"):
        rate = rates.get(kind) or 0.0
        at = d.rng.expovariate(rate) if rate > 0 else window_s
        while at < window_s:
            jobs.append(d.job(kind, at))
            at += d.rng.expovariate(rate)
    return sorted(jobs, key=lambda j: j.at)


def describe(jobs: list[Job]) -> dict:
    kinds = {}
    for j in jobs:
        kinds[j.kind] = kinds.get(j.kind, 0) + 1
    return {"jobs": len(jobs), **kinds, "sequences": sum(j.sequences for j in jobs),
            "prompt_tokens_first": sum(len(p) for j in jobs for p in j.prompts),
            "output_tokens": sum(j.output_tokens for j in jobs),
            "last_arrival_s": round(max((j.at for j in jobs), default=0.0), 3)}
