"""What one step runs: `StepBatch`, built by the scheduler, executed by the model runner.

Decode rows are one int64 array (the runner copies it to pinned memory as it is); chunks are
plain lists of ints (packed into one buffer per step). Rows come in two kinds:
- decode rows (`DecodeRows`): one token per sequence, fed at `positions[i]`; its input token is
  `tokens[i]`, or, when `src[i] >= 0`, the token the previous step sampled in its output row
  `src[i]` (still on the device: the step is launched before the host has read it);
- prefill chunks (`Chunks`): runs of known tokens of one sequence (a prompt, or a recompute after
  preemption), `q_lens[c]` tokens ending at position `kv_lens[c] - 1`.
A step with chunks runs one eager forward over chunks + decode rows (one weight read for both); a
step with decode rows only replays the CUDA graph of the smallest bucket that holds them.

Sampled rows, in output order: every decode row, then every chunk with `sample[c]` (its last token
completes the known tokens). Output row j of this step is what `src` of the next step refers to.
Every fed token writes its KV to `slots[i] = block * block_size + offset`; the runner also writes
`block_tables[table_row, position // block_size] = slot // block_size` for it, so the device block
table follows the scheduler without a separate update stream. Blocks a sequence gets from the
prefix cache are never fed: they arrive as `table_writes`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from replica.sequence import Sequence


COLUMNS = ("tokens", "src", "positions", "table_rows", "slots", "steps")   # DecodeRows.cols, in order


@dataclass
class DecodeRows:
    """One row per decoding sequence: `seqs`, and their inputs as one int64 array `cols` of shape
    (len(COLUMNS), rows), which the runner copies to the device as it is:
    tokens   input token (unused where src >= 0)
    src      the previous step's output row holding the input token, or -1
    positions position of the fed token
    table_rows block-table / sampling-table row
    slots    KV slot of the fed token
    steps    output index of the sampled token"""
    seqs: list[Sequence] = field(default_factory=list)
    cols: np.ndarray = field(default_factory=lambda: np.zeros((len(COLUMNS), 0), np.int64))

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class Chunks:
    seqs: list[Sequence] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)       # all chunks' tokens, back to back
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    q_lens: list[int] = field(default_factory=list)       # tokens per chunk
    kv_lens: list[int] = field(default_factory=list)      # KV length after the chunk (= end position + 1)
    table_rows: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)      # the chunk's last token is sampled
    steps: list[int] = field(default_factory=list)        # output index sampled (where sample)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def add(self, seq: Sequence, start: int, end: int, block_size: int, sample: bool) -> None:
        self.seqs.append(seq)
        self.tokens.extend(seq.tokens(start, end))
        self.positions.extend(range(start, end))
        table = seq.block_table
        self.slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        self.q_lens.append(end - start)
        self.kv_lens.append(end)
        self.table_rows.append(seq.row)
        self.sample.append(sample)
        self.steps.append(seq.generated)


@dataclass
class StepBatch:
    decode: DecodeRows = field(default_factory=DecodeRows)
    chunks: Chunks = field(default_factory=Chunks)
    admitted: list[Sequence] = field(default_factory=list)        # runner writes their sampling rows
    table_writes: list[tuple[int, int, int]] = field(default_factory=list)   # (row, col, block)
    greedy: bool = True          # every sampled row is plain argmax (the runner's cheaper graph)
    logprobs: bool = False       # some sampled row asks for logprobs

    @property
    def mixed(self) -> bool:
        return len(self.chunks) > 0

    @property
    def sampled(self) -> list[Sequence]:
        """Sequences of the output rows, in output-row order."""
        return self.decode.seqs + [s for s, smp in zip(self.chunks.seqs, self.chunks.sample) if smp]

    @property
    def num_sampled(self) -> int:
        return len(self.decode) + sum(self.chunks.sample)

    @property
    def prefill_tokens(self) -> int:
        return self.chunks.num_tokens

    def __bool__(self) -> bool:
        return len(self.decode) > 0 or len(self.chunks) > 0
