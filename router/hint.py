"""A caller's `RoutingHint`, checked and reduced to what the time estimate needs (`Batch`).

Contract: `coerce_hint(obj)` takes a `RoutingHint` or a mapping with its fields (callers are
untrusted) and returns a `RoutingHint`, or None when the two required fields are missing or
invalid. Optional (version 2) fields that are invalid fall back to their defaults one by one, so a
bad prefix summary never costs the batch its shape. `batch_of(hint)` normalises a valid hint into
a `Batch`: clamped counts and the decode steps of the batch's longest sequence.

Pure Python, never raises from `coerce_hint`; bounded work: at most `MAX_HINT_PROMPTS` prompts of
`MAX_HINT_DEPTHS` (depth, hash) pairs are kept.
"""
from __future__ import annotations

import operator
from itertools import islice
from typing import Any, NamedTuple, Optional

from router.stats import RoutingHint

MAX_HINT_PROMPTS = 4096   # prompts whose prefix summary is kept (a batch beyond: the rest uncached)
MAX_HINT_DEPTHS = 64      # (depth, hash) pairs per prompt (summary_depths: <= 63 up to 128k tokens)
MAX_COUNT = 1 << 50       # counts are clamped here so float arithmetic stays finite

Prefixes = tuple[tuple[tuple[int, int], ...], ...]


class Batch(NamedTuple):
    """One request batch as the estimate sees it (all counts >= 0, clamped to `MAX_COUNT`)."""
    sequences: int           # n >= 1
    prompt_tokens: int       # over all sequences; 0 when the hint did not say
    decode_steps: int        # decode steps of the longest sequence (its first token comes from prefill)
    prompts: Prefixes        # per prompt: ((depth_blocks, hash), ...)
    samples_per_prompt: int  # sequences each prompt's prefix serves


def coerce_hint(obj: Any) -> Optional[RoutingHint]:
    """A `RoutingHint` from an instance or a mapping with the same fields; None when absent or
    when `num_sequences` / `max_total_tokens` are not positive ints. Never raises."""
    if obj is None:
        return None
    try:
        get = obj.get if not isinstance(obj, RoutingHint) else (lambda k, d=None: getattr(obj, k, d))
        n, t = _int(get("num_sequences")), _int(get("max_total_tokens"))
        if n is None or t is None or n < 1 or t < 1:
            return None
        prompt_tokens = _int(get("prompt_tokens", 0))
        max_new = _int(get("max_new_tokens", 0))
        samples = _int(get("samples_per_prompt", 1))
        return RoutingHint(n, t,
                           prompt_tokens=prompt_tokens if prompt_tokens and prompt_tokens > 0 else 0,
                           max_new_tokens=max_new if max_new and max_new > 0 else 0,
                           prefix_hashes=_prefixes(get("prefix_hashes", ())),
                           samples_per_prompt=samples if samples and samples > 0 else 1)
    except Exception:  # untrusted caller input: any failure just means "no hint"
        return None


def batch_of(hint: RoutingHint) -> Batch:
    """The `Batch` of a hint that `coerce_hint` returned.

    Decode steps: the longest sequence generates `max_new_tokens / num_sequences` tokens (one
    `max_tokens` per request), the first of them at prefill, so it runs one decode step fewer.
    Without `max_new_tokens` (a version-1 hint) the budget is `max_total_tokens` minus the mean
    prompt length (the whole `max_total_tokens` when prompt tokens are unknown too): an upper bound.
    """
    n = min(hint.num_sequences, MAX_COUNT)
    prompt = min(hint.prompt_tokens, MAX_COUNT)
    if hint.max_new_tokens > 0:
        new = -(-min(hint.max_new_tokens, MAX_COUNT) // n)
    else:
        new = max(min(hint.max_total_tokens, MAX_COUNT) - (-(-prompt // n)), 1)
    return Batch(n, prompt, new - 1, hint.prefix_hashes, min(hint.samples_per_prompt, MAX_COUNT))


def _int(x: Any) -> Optional[int]:
    """An int (numpy ints too), never a bool, float or string; None otherwise."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _prefixes(raw: Any) -> Prefixes:
    """Per-prompt (depth >= 1, hash) int pairs; a malformed pair is skipped, a malformed prompt
    entry counts as a prompt without a summary, a malformed container gives ()."""
    if isinstance(raw, (str, bytes)) or raw is None:
        return ()
    try:
        return tuple(_pairs(p) for p in islice(raw, MAX_HINT_PROMPTS))
    except Exception:
        return ()


def _pairs(prompt: Any) -> tuple[tuple[int, int], ...]:
    out = []
    try:
        for pair in islice(prompt, MAX_HINT_DEPTHS):
            try:
                d, h = pair
            except (TypeError, ValueError):
                continue
            d, h = _int(d), _int(h)
            if d is not None and h is not None and d >= 1:
                out.append((d, h))
    except TypeError:  # not iterable
        pass
    return tuple(out)
