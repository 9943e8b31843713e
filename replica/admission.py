"""The order in which waiting sequences are admitted: longest output first, within a window.

`admission_order(waiting, window_s)` takes the scheduler's waiting sequences (in arrival order,
`Sequence.arrived_s` ascending) and returns those not in flight, in the order one step may admit
them: the ones that arrived within `window_s` seconds of the oldest, most output tokens left first
(`max_output` less the output a preempted sequence already has) and the oldest on ties, then the
rest in arrival order. `window_s` 0 is first come, first served.

Why: a burst's sequences start over the steps of its prefill phase and run different lengths, so
in arrival order they end over a long tail of ever smaller decode batches, each reading every
weight. Admitting the most work first makes the ends meet (longest processing time first; SGLang's
longest-output-first). The window bounds the unfairness: nothing waits behind a request that
arrived more than `window_s` after it. It is in seconds because a burst can reach the scheduler
over several steps (a process engine's child reads its pipe between steps).
"""
from __future__ import annotations

import bisect

from replica.sequence import Sequence

MAX_ORDERED = 2048    # the most waiting sequences one step orders by output left (the rest wait)


def admission_order(waiting: list[Sequence], window_s: float) -> list[Sequence]:
    ready = [s for s in waiting if s.pending == 0]
    if not ready or not window_s:
        return ready
    cut = bisect.bisect_right(ready, ready[0].arrived_s + window_s, hi=min(len(ready), MAX_ORDERED),
                              key=lambda s: s.arrived_s)
    head = sorted(ready[:cut], key=lambda s: s.max_output - len(s.output_ids), reverse=True)  # stable
    return head + ready[cut:]
