"""When a batch's first and last token would arrive at one replica: the router's time model.

Contract: `estimate(batch, stats, ahead, prior, recent)` returns an `Estimate` for a `Batch`
(router/hint.py) on a replica with usable `ReplicaStats`, given what this router sent there that
those stats do not show yet (`Outstanding`, router/inflight.py), the fleet's measured rates
(`fleet_prior`) and the prefix hashes this router sent there recently (`recent`). `score` turns
an estimate into the number the policy ranks by, smaller first. docs/routing-estimate.md gives
the formula with the source of every input.

    rows   = max(running + queued - finished + recent, sequences_in_flight) + n
    backlog = published backlog x (running + queued - finished) / (running + queued), draining at
              rate since the stats, + each recent request's prompt tokens from when it was sent
    wait   = steps until a row frees for its last sequence (`wait_steps`) x step
    t_first = max(backlog / rate, wait) + (prompt_tokens - cached) / rate
    t_last  = t_first + decode_steps * step(min(rows, row_limit))
    score   = t_last + FIRST_TOKEN_WEIGHT / n * t_first
    (replicas that share a GPU: t_first adds their queued prefill seconds, each step their step)

Pure arithmetic on plain numbers: no Ray, no torch, no clock. It never raises for usable stats
(`policy.is_usable`) and a hint from `coerce_hint`, whatever the version-2 fields hold (NaN,
negative, huge, wrong types): a bad rate counts as unmeasured, a bad count as 0, and every
result is finite.
"""
from __future__ import annotations

import math
import operator
from statistics import median
from typing import Any, Container, Iterable, Mapping, NamedTuple, Optional

from router.buckets import bucket_for
from router.hint import MAX_COUNT, Batch
from router.inflight import Outstanding
from router.stats import ReplicaStats

# A decode step past the largest captured bucket runs eagerly: about the launch-bound eager forward
# (13.5 ms for llama-8b on H100) over the graph replay at bucket 64 (8.8 ms): 1.54x,
# results/prefill_probe-h100-2026-11-27.json. Smaller buckets replay faster, so 1.6, not 1.5.
EAGER_STEP_FACTOR = 1.6
# Defaults for a fleet that has measured nothing yet: llama-8b graph steps on H100, 6.35 ms at one
# row to 8.29 ms at 64 (docs/perf-notes.md); prefill: one 512-token forward in 13.5 ms is 38k
# tokens/s (prefill probe), 30k leaves room for the decode rows of mixed steps (a guess, not measured).
DEFAULT_STEP_S = 0.0063
DEFAULT_STEP_S_PER_ROW = 0.00003
DEFAULT_PREFILL_TOKENS_PER_S = 30_000.0
# A batch that must wait for KV blocks (rows free) waits at least this many steps: the replica
# does not publish how many blocks its sequences will free, nor when.
MIN_WAIT_STEPS = 32
# Weight of the first-token time next to the last-token time, divided by the batch's sequences:
# a one-prompt request counts its TTFT twice, a 64-sequence batch ranks by its last token.
FIRST_TOKEN_WEIGHT = 1.0
MAX_STEP_S = 60.0              # a published step time beyond this is clamped (bad data)
MIN_PREFILL_TOKENS_PER_S = 1.0  # a published rate below this is clamped
MAX_SCORE = 1e30


class Prior(NamedTuple):
    """What the fleet measured: used by a replica that has not measured it itself (a fresh one)."""
    step_s: Mapping[int, float]    # bucket -> median step seconds over usable replicas
    prefill_tokens_per_s: float    # median prefill rate; 0.0 when nobody measured one


NO_PRIOR = Prior({}, 0.0)


class Estimate(NamedTuple):
    first_token_s: float       # from now until the batch's prefill is done (its first tokens)
    last_token_s: float        # from now until its longest sequence's last token
    rows: int                  # decode rows while it decodes (capped at the replica's row limit)
    bucket: Optional[int]      # captured bucket those rows replay; None: eager steps
    waves: int                 # 1: admitted now; more: waits for rows or KV blocks to free
    prefill_tokens: int        # its prompt tokens not cached there (what it adds to the backlog)

    @property
    def graph(self) -> bool:
        """It decodes inside a captured graph."""
        return self.bucket is not None

    @property
    def padding(self) -> int:
        return self.bucket - self.rows if self.bucket is not None else 0


class Shared(NamedTuple):
    """What the other replicas on this replica's GPU hold (they time-share it, `ReplicaStats.device`):
    the seconds of prefill queued there, and the seconds their decode steps add to each of ours."""
    prefill_s: float = 0.0
    step_s: float = 0.0


NO_SHARED = Shared()


def device_load(stats: ReplicaStats, ahead: Outstanding = Outstanding(), prior: Prior = NO_PRIOR,
                age_s: float = 0.0) -> Shared:
    """What this replica puts on its GPU for a neighbour's estimate: the seconds its queued
    prefill takes, and its decode step at the rows it holds (0 when none)."""
    rate = prefill_rate(stats, prior)
    held, backlog = _held_and_backlog(stats, ahead, rate, age_s)
    rows = min(held, row_limit(stats))
    return Shared(backlog / rate, step_time(stats, rows, prior)[0] if rows > 0 else 0.0)


def _held_and_backlog(stats: ReplicaStats, ahead: Outstanding, rate: float, age_s: float) -> tuple[int, float]:
    """Sequences the replica holds now (its stats less those seen finishing, plus what this router
    sent since) and the prompt tokens queued for prefill there now."""
    shown = _int(stats.running) + _int(stats.queued)
    published = max(shown - _int(ahead.finished_sequences), 0)
    pending = _num(stats.prefill_backlog_tokens)
    if shown:   # the backlog of sequences seen finishing since the stats is gone: pro rata
        pending *= published / shown
    held = max(published + _int(ahead.recent_sequences), _int(ahead.sequences))
    return held, queued_prefill(pending, ahead, rate, _num(age_s))


def estimate(batch: Batch, stats: ReplicaStats, ahead: Outstanding = Outstanding(),
             prior: Prior = NO_PRIOR, recent: Container[int] = (), age_s: float = 0.0,
             shared: Shared = NO_SHARED) -> Estimate:
    """The batch's first- and last-token times on this replica (see the module docstring);
    `age_s`: how old the stats are (it shortens the published time to the first free row);
    `shared`: the load of replicas on the same GPU, whose prefill runs before ours and whose
    steps interleave with ours."""
    own = batch.prompt_tokens - cached_tokens(batch, stats, recent)
    rate = prefill_rate(stats, prior)
    held, backlog = _held_and_backlog(stats, ahead, rate, age_s)
    total = min(held + batch.sequences, MAX_COUNT)
    cap = row_limit(stats)
    rows = min(total, cap)
    step, bucket = step_time(stats, rows, prior)
    waves = -(-total // cap)
    if waves == 1 and not _admits_now(batch, stats, ahead, own):
        waves = 2
    wait = wait_steps(batch, stats, total - cap, waves, _num(age_s) / step) * step
    first = max(backlog / rate + _num(shared.prefill_s), wait) + own / rate
    return Estimate(first, first + batch.decode_steps * (step + _num(shared.step_s)), rows, bucket, waves, own)


def queued_prefill(pending: float, ahead: Outstanding, rate: float, age_s: float) -> float:
    """Prompt tokens still queued for prefill now, `age_s` after the stats: a FIFO queue that held
    `pending` at the stats' time, drains at `rate`, and takes each request this router sent since
    when it was sent (`ahead.recent_sends`). Without send times (a hand-built `Outstanding`), the
    recent prompt tokens count whole. Counting them whole until the next publish kept a replica
    looking busy with prefills done long ago: in benchmarks/route_sim.py a chat turn then went to a
    replica with 2k tokens queued while the other, "holding" 3.6k already prefilled, was idle."""
    sends = ahead.recent_sends if isinstance(ahead.recent_sends, tuple) else ()
    if not sends:
        return max(pending - rate * age_s, 0.0) + _num(ahead.recent_prompt_tokens)
    queued, at = pending, 0.0
    for offset, tokens in sends:
        offset = min(max(_num(offset), at), age_s)
        queued = max(queued - rate * (offset - at), 0.0) + _num(tokens)
        at = offset
    return max(queued - rate * (age_s - at), 0.0)


def wait_steps(batch: Batch, stats: ReplicaStats, excess: int, waves: int, age_steps: float) -> float:
    """Decode steps before the batch's last sequence is admitted. Past the row limit (`excess`
    sequences, the batch's included, beyond `row_limit`): rows free at row_limit / L per step, L
    the replica's mean output length (else the batch's own), and none before its first running
    sequence ends (`min_remaining_steps`, less the steps run since the stats). Short of KV blocks
    only: one wave of max(S, MIN_WAIT_STEPS) steps (the blocks sequences free are not published)."""
    if waves == 1:
        return 0.0
    if excess <= 0:
        return float(max(batch.decode_steps, MIN_WAIT_STEPS))
    length = _num(stats.mean_output_tokens) or batch.decode_steps + 1
    first_free = max(_num(stats.min_remaining_steps) - age_steps, 0.0)
    return max(excess * length / row_limit(stats), first_free)


def score(est: Estimate, batch: Batch) -> float:
    """Rank value, smaller first: `t_last + FIRST_TOKEN_WEIGHT / n * t_first` (always finite)."""
    s = est.last_token_s + FIRST_TOKEN_WEIGHT / batch.sequences * est.first_token_s
    return s if math.isfinite(s) else MAX_SCORE


def step_time(stats: ReplicaStats, rows: int, prior: Prior = NO_PRIOR) -> tuple[float, Optional[int]]:
    """Seconds of one decode step with `rows` rows, and the captured bucket it replays (None when
    `rows` exceeds them all: an eager step, `EAGER_STEP_FACTOR` x the curve, on a replica with
    graphs; a replica without graphs measured eager steps already).

    The curve: the replica's own measured buckets (`decode_step_s`), else the fleet's (`prior`);
    between two measured buckets, linear; beyond them, the nearest one scaled by the shape of the
    default curve (`DEFAULT_STEP_S + DEFAULT_STEP_S_PER_ROW * (rows - 1)`), which is also the
    curve when nothing is measured anywhere. Padding rows cost like real ones: the step is the
    bucket's."""
    bucket = bucket_for(max(rows, 1), stats.captured_buckets)
    points = measured_steps(stats) or _clean_steps(prior.step_s)
    if bucket is not None:
        return _curve(points, bucket), bucket
    t = _curve(points, rows)
    return (t * EAGER_STEP_FACTOR if stats.graphs is True else t), None


def cached_tokens(batch: Batch, stats: ReplicaStats, recent: Container[int] = ()) -> int:
    """Prompt tokens of the batch the replica holds in its prefix cache: per prompt, the deepest
    summary depth whose hash the replica published (or this router sent there recently, `recent`)
    times `block_size`, times the samples per prompt; capped at the batch's prompt tokens."""
    bs = _int(stats.block_size)
    if not bs or not batch.prompts or not batch.prompt_tokens:
        return 0
    try:
        held = stats.prefix_set
    except Exception:   # a hand-built ReplicaStats with unhashable entries
        held = frozenset()
    blocks = 0
    for pairs in batch.prompts:
        blocks += max((d for d, h in pairs if h in held or h in recent), default=0)
    return min(blocks * bs * batch.samples_per_prompt, batch.prompt_tokens)


def prefill_rate(stats: ReplicaStats, prior: Prior = NO_PRIOR) -> float:
    """Prompt tokens per second: the replica's own, else the fleet's, else the default."""
    own = _num(stats.prefill_tokens_per_s)
    rate = own or _num(prior.prefill_tokens_per_s) or DEFAULT_PREFILL_TOKENS_PER_S
    return max(rate, MIN_PREFILL_TOKENS_PER_S)


def row_limit(stats: ReplicaStats) -> int:
    """Sequences the replica decodes at once: `max_num_seqs`, and with `fallback: queue` (no eager
    steps) no more than its largest bucket."""
    cap = _int(stats.max_num_seqs)
    if stats.fallback == "queue":
        cap = min(cap, stats.captured_buckets[-1])
    return max(min(cap, MAX_COUNT), 1)


def fleet_prior(fleet: Iterable[ReplicaStats]) -> Prior:
    """Per bucket, the median measured step time over `fleet`; the median measured prefill rate."""
    steps: dict[int, list[float]] = {}
    rates = []
    for stats in fleet:
        for b, t in measured_steps(stats).items():
            steps.setdefault(b, []).append(t)
        rate = _num(stats.prefill_tokens_per_s)
        if rate:
            rates.append(rate)
    return Prior({b: median(ts) for b, ts in steps.items()}, median(rates) if rates else 0.0)


def measured_steps(stats: ReplicaStats) -> dict[int, float]:
    """The replica's `decode_step_s` entries with a positive int bucket and a positive finite time
    (clamped to `MAX_STEP_S`)."""
    return _clean_steps(stats.decode_step_s)


def _clean_steps(steps: Any) -> dict[int, float]:
    try:
        items = list(steps.items())
    except Exception:
        return {}
    out = {}
    for b, t in items:
        try:
            v = float(t)
        except (TypeError, ValueError, OverflowError):
            continue
        if isinstance(b, int) and not isinstance(b, bool) and b >= 1 and 0 < v < math.inf:
            out[b] = min(v, MAX_STEP_S)
    return out


def _curve(points: Mapping[int, float], x: int) -> float:
    if x in points:
        return points[x]
    if not points:
        return _default_step(x)
    lo = max((b for b in points if b < x), default=None)
    hi = min((b for b in points if b > x), default=None)
    if lo is not None and hi is not None:
        return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)
    anchor = lo if lo is not None else hi
    return points[anchor] * _default_step(x) / _default_step(anchor)


def _default_step(rows: int) -> float:
    return DEFAULT_STEP_S + DEFAULT_STEP_S_PER_ROW * (rows - 1)


def _admits_now(batch: Batch, stats: ReplicaStats, ahead: Outstanding, prefill_tokens: int) -> bool:
    """The replica has free slots, and KV blocks where it publishes them, for the whole batch on
    top of what this router sent since its stats (slots that finished since count as free; their
    blocks do not, their size is not recorded)."""
    recent_seqs, recent_tokens = _int(ahead.recent_sequences), _int(ahead.recent_prompt_tokens)
    if batch.sequences > _int(stats.free_slots) + _int(ahead.finished_sequences) - recent_seqs:
        return False
    bs, total = _int(stats.block_size), _int(stats.total_blocks)
    if not bs or not total:
        return True
    need = -(-prefill_tokens // bs) + batch.sequences
    taken = -(-recent_tokens // bs) + recent_seqs
    return need <= _int(stats.free_blocks) - taken


def _num(x: Any) -> float:
    """`x` as a finite float in [0, MAX_COUNT]; 0.0 for NaN, negatives and non-numbers."""
    try:
        v = float(x)
    except OverflowError:        # an int too large for a float
        return float(MAX_COUNT) if x > 0 else 0.0
    except (TypeError, ValueError):
        return 0.0
    return min(v, float(MAX_COUNT)) if v > 0 else 0.0   # NaN > 0 is False


def _int(x: Any) -> int:
    """`x` as an int in [0, MAX_COUNT] (numpy ints too; bools and non-ints: 0)."""
    if isinstance(x, bool):
        return 0
    try:
        return min(max(operator.index(x), 0), MAX_COUNT)
    except TypeError:
        return 0
