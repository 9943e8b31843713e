"""The steady decode step as arrays: the last step's decode rows one position on, less the rows
that leave. Pure numpy over `DecodeRows.cols` (replica/batch.py); blocks, rows and sequence state
stay with the scheduler, which calls `advance` from `Scheduler._repeat_decode` and then gives the
rows that enter a new block their block.

Why: at 500 rows the general plan walks every sequence every step (~1 us a row on a dev CPU);
this path costs a few array operations plus one Python touch per row.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from replica.batch import COLUMNS, DecodeRows
from replica.sequence import Sequence, Status

TOKENS, SRC, POSITIONS, SLOTS, STEPS = (COLUMNS.index(c) for c in ("tokens", "src", "positions", "slots", "steps"))
MAX_TOKENS, PLAIN_GREEDY, LOGPROBS = range(3)      # rows of `row_params`


def row_params(seqs: list[Sequence]) -> np.ndarray:
    """(3, rows) int64, one pass over the rows: max_tokens, plain greedy (0/1), wants logprobs (0/1)."""
    rows = [(s.params.max_tokens, s.params.plain_greedy, s.params.logprobs is not None) for s in seqs]
    return np.array(rows, dtype=np.int64).reshape(-1, 3).T


def advance(prev: DecodeRows, params: np.ndarray, max_seq_len: int, check_status: bool
            ) -> Optional[tuple[list[Sequence], np.ndarray, np.ndarray]]:
    """`prev`'s rows one position on: (seqs, cols, params) of the rows that stay, or None if none
    does. A row leaves when its next output would pass max_tokens or its next position reach
    max_seq_len, and, with `check_status` (sequences finished or aborted since `prev`), when its
    sequence is no longer running: the rows the general plan would skip. In the new cols every
    row's input is the token it sampled in `prev` (tokens 0, src = its row index in `prev`) and
    its slot is the next one in its block; a row whose position starts a block
    (`positions % block_size == 0`) still needs that block's slot from the caller. `prev` is not
    changed."""
    cols = prev.cols.copy()
    cols[POSITIONS] += 1
    cols[STEPS] += 1
    stays = (cols[STEPS] < params[MAX_TOKENS]) & (cols[POSITIONS] + 1 < max_seq_len)
    seqs = prev.seqs
    if check_status:
        stays &= np.fromiter((s.status is Status.RUNNING for s in seqs), bool, len(seqs))
    src = np.arange(len(seqs))
    if not stays.all():
        src = np.flatnonzero(stays)
        if not len(src):
            return None
        cols, params = cols[:, src], params[:, src]
        seqs = [seqs[j] for j in src.tolist()]
    cols[TOKENS] = 0
    cols[SRC] = src
    cols[SLOTS] += 1
    return seqs, cols, params
