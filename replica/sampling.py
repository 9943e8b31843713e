"""Token selection inside the CUDA graph, with per-sequence parameters held in device tables.

`SamplingTables` holds one row per admitted sequence (the scheduler's block-table row; the last
row is scratch for padding): temperature, top-k/top-p/min-p, seed, penalties, logit bias,
min_tokens with the ids it holds back, and the token counts penalties need (output counts; prompt
presence). `write` fills rows at admission in
one packed copy; a step then passes only `rows` and `steps` ([B] int64 each), so the sampling graph
of a bucket never changes and never syncs.

Two paths:
- `greedy(logits)`: argmax of the raw logits (every row plain greedy: no bias, penalty or logprobs);
- `full(logits, rows, steps)`: bias -> min_tokens bans -> penalties -> temperature -> top-k / top-p / min-p -> draw,
  with greedy rows (temperature 0) taking the argmax of the processed logits; also the raw
  distribution's log-probabilities (log_softmax before any processing: vLLM's default) of the chosen
  token and the top `MAX_LOGPROBS`, and the output counts updated with the chosen tokens.
  On CUDA the penalties, the draw and the logprobs run as Triton kernels without a sort
  (replica/kernels/sample.py: 18 ms -> well under 1 ms a step at 512 rows of a 128k vocabulary);
  the torch code here is their reference and the CPU path. Both draw the same tokens from the
  same noise, except where two logits tie exactly at a top-k / top-p cut.
Randomness is a counter-based hash of (seed, step, token id): a request's tokens depend only on its
own seed and output index, not on its batch row or bucket, so recompute after preemption redraws
the same tokens. The draw is an exponential race, argmax(p_i / E_i), E_i ~ Exp(1) (gpt-fast's
trick to avoid torch.multinomial's sync), with hashed instead of generator noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from replica.kernels import HAS_TRITON, use_triton
from replica.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MIN_TOKENS_BANS, SamplingParams

if HAS_TRITON:
    from replica.kernels import sample as _kernels

_M32 = 0xFFFFFFFF
# float columns of the table, and its int columns
F_TEMP, F_TOP_P, F_MIN_P, F_PRESENCE, F_FREQUENCY, F_REPETITION = range(6)
I_TOP_K, I_SEED, I_MIN_TOKENS, I_LOGPROBS = range(4)    # I_LOGPROBS: k, or -1 when off


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32). The multipliers are below
    2^31, so products stay below 2^63 and int64 never overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """U(0,1) noise [B, V] keyed by (seeds[b], steps[b], token_ids[b, j]); float32, never 0 or 1."""
    row = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ _mix32(steps & _M32)))  # [B]
    x = _mix32(_mix32(row[:, None] ^ ((token_ids * 0x27D4EB2F) & _M32)))                  # [B, V]
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def draw(x: torch.Tensor, temperature, top_k, top_p, min_p, seeds, steps) -> torch.Tensor:
    """x [B, V] fp32 processed logits; per-row temperature [B] (0 = greedy), top_k [B] i64 (0 = off),
    top_p [B] (1 = off), min_p [B] (0 = off), seeds [B] i64, steps [B] i64. Returns tokens [B]."""
    V = x.shape[-1]
    scaled = x / temperature.clamp_min(1e-5)[:, None]
    sorted_logits, sorted_ids = torch.sort(scaled, dim=-1, descending=True)       # [B, V]
    probs = torch.softmax(sorted_logits, dim=-1)
    ranks = torch.arange(V, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    # Nucleus: keep a token while the mass before it is < top_p, so the top token always stays.
    keep = (ranks < k) & ((probs.cumsum(-1) - probs) < top_p[:, None])
    keep &= probs >= min_p[:, None] * probs[:, :1]
    race = probs * keep / -torch.log(uniform_noise(seeds, steps, sorted_ids))      # p_i / Exp(1)
    sampled = sorted_ids.gather(1, race.argmax(-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, sampled, x.argmax(-1))


@dataclass
class SampleOutput:
    """Device tensors of one sampling pass (views into the caller's buffers where given)."""
    tokens: torch.Tensor          # [B] int64
    logprob: torch.Tensor         # [B] fp32, chosen token under the raw distribution
    top_ids: torch.Tensor         # [B, MAX_LOGPROBS] int64
    top_logprobs: torch.Tensor    # [B, MAX_LOGPROBS] fp32


class SamplingTables:
    def __init__(self, num_rows: int, vocab_size: int, device: torch.device):
        R, V = num_rows + 1, vocab_size           # + the scratch row padding rows use
        self.scratch_row = num_rows
        self.floats = torch.zeros(R, 6, dtype=torch.float32, device=device)
        self.floats[:, F_TOP_P] = 1.0
        self.floats[:, F_REPETITION] = 1.0
        self.ints = torch.zeros(R, 4, dtype=torch.long, device=device)          # I_* columns
        self.ints[:, I_LOGPROBS] = -1
        self.bias_ids = torch.zeros(R, MAX_LOGIT_BIAS, dtype=torch.long, device=device)
        self.bias_vals = torch.zeros(R, MAX_LOGIT_BIAS, dtype=torch.float32, device=device)
        # min_tokens: the ids a row may not draw before its min_tokens-th token; -inf, 0 = unused
        self.ban_ids = torch.zeros(R, MIN_TOKENS_BANS, dtype=torch.long, device=device)
        self.ban_vals = torch.zeros(R, MIN_TOKENS_BANS, dtype=torch.float32, device=device)
        self.counts = torch.zeros(R, V, dtype=torch.int32, device=device)       # output tokens
        self.prompt_seen = torch.zeros(R, V, dtype=torch.bool, device=device)
        self.device = device

    @staticmethod
    def bytes_for(num_rows: int, vocab_size: int) -> int:
        return (num_rows + 1) * (vocab_size * 5 + (MAX_LOGIT_BIAS + MIN_TOKENS_BANS) * 12 + 56)

    def write(self, rows: list[int], params: list[SamplingParams], seeds: list[int],
              prompts: list[list[int]], outputs: list[list[int]], stop_ids: list) -> None:
        """Fill the rows of newly admitted sequences (eager, before the step that first samples
        them). `stop_ids[k]`: the token ids that end sequence k (what min_tokens holds back; ids
        past the vocabulary are never drawn anyway). Penalty counts are rebuilt only for sequences
        that use penalties (a recompute after preemption counts its earlier output again)."""
        f = torch.tensor([[p.temperature, p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
                           p.repetition_penalty] for p in params], dtype=torch.float32)
        i = torch.tensor([[p.top_k, s, p.min_tokens, -1 if p.logprobs is None else p.logprobs]
                          for p, s in zip(params, seeds)], dtype=torch.long)
        bias = _id_table([p.logit_bias for p in params], MAX_LOGIT_BIAS)
        V = self.counts.shape[1]
        bans = _id_table([[(t, float("-inf")) for t in sorted(ids) if t < V] if p.min_tokens else ()
                          for p, ids in zip(params, stop_ids)], MIN_TOKENS_BANS)
        idx = _to(torch.tensor(rows, dtype=torch.long), self.device)
        self.floats.index_copy_(0, idx, _to(f, self.device))
        self.ints.index_copy_(0, idx, _to(i, self.device))
        for table, host in zip((self.bias_ids, self.bias_vals, self.ban_ids, self.ban_vals), bias + bans):
            table.index_copy_(0, idx, _to(host, self.device))
        pen = [k for k, p in enumerate(params) if _uses_penalties(p)]
        if pen:
            self._write_counts([rows[k] for k in pen], [prompts[k] for k in pen], [outputs[k] for k in pen])

    def _write_counts(self, rows: list[int], prompts: list[list[int]], outputs: list[list[int]]) -> None:
        idx = _to(torch.tensor(rows, dtype=torch.long), self.device)
        self.counts.index_fill_(0, idx, 0)
        self.prompt_seen.index_fill_(0, idx, False)
        p_rows = [r for r, p in zip(rows, prompts) for _ in p]
        p_toks = [t for p in prompts for t in p]
        self.prompt_seen[_to(torch.tensor(p_rows), self.device), _to(torch.tensor(p_toks), self.device)] = True
        o_rows = [r for r, o in zip(rows, outputs) for _ in o]
        if o_rows:
            o_toks = [t for o in outputs for t in o]
            self.counts.index_put_((_to(torch.tensor(o_rows), self.device), _to(torch.tensor(o_toks), self.device)),
                                   torch.ones(len(o_rows), dtype=torch.int32, device=self.device), accumulate=True)

    # -- inside the graph -----------------------------------------------------------------------
    def processed(self, raw: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """raw fp32 logits [B, V] -> after logit bias, min_tokens bans and penalties (before
        temperature). steps [B]: the output index each row samples."""
        f = self.floats[rows]                                                        # [B, 6]
        x = self._add_bias_and_bans_(raw.clone(), rows, steps)
        counts = self.counts[rows]                                                   # [B, V]
        seen = (counts > 0) | self.prompt_seen[rows]
        rep = f[:, F_REPETITION, None]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        return x - f[:, F_PRESENCE, None] * (counts > 0) - f[:, F_FREQUENCY, None] * counts

    def _add_bias_and_bans_(self, x: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """x [B, V] fp32 in place: logit bias, then min_tokens bans while a row is held."""
        x.scatter_add_(1, self.bias_ids[rows], self.bias_vals[rows])
        held = (steps < self.ints[rows, I_MIN_TOKENS])[:, None]                      # [B, 1]
        return x.scatter_add_(1, self.ban_ids[rows], torch.where(held, self.ban_vals[rows], 0.0))

    def full(self, logits: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor, out: SampleOutput) -> None:
        """logits [B, V]; rows, steps [B] int64. Writes tokens, logprobs and top logprobs into `out`
        (logprobs only for the rows that ask, on CUDA)."""
        if use_triton(logits):
            x = self._add_bias_and_bans_(logits.to(torch.float32, copy=True), rows, steps)   # [B, V]
            _kernels.apply_penalties_(x, rows, self.floats, self.counts, self.prompt_seen)
            _kernels.draw(x, rows, steps, self.floats, self.ints, out.tokens)
            _kernels.top_logprobs(logits, rows, self.ints, out.tokens, out.logprob, out.top_logprobs,
                                  out.top_ids)
        else:
            self.full_torch(logits, rows, steps, out)
        V = self.counts.shape[1]   # atomics on a flat view: capture-safe, duplicates (padding) add up
        self.counts.view(-1).scatter_add_(0, rows * V + out.tokens, torch.ones_like(out.tokens, dtype=torch.int32))

    def full_torch(self, logits: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor, out: SampleOutput) -> None:
        """`full` in torch, without the counts update: the CPU path and the kernels' reference."""
        raw = logits.float()
        f, ints = self.floats[rows], self.ints[rows]                                 # [B, 6], [B, 4]
        x = self.processed(raw, rows, steps)
        tok = draw(x, f[:, F_TEMP], ints[:, I_TOP_K], f[:, F_TOP_P], f[:, F_MIN_P], ints[:, I_SEED], steps)
        out.tokens.copy_(tok)
        lp = torch.log_softmax(raw, dim=-1)
        out.logprob.copy_(lp.gather(1, tok[:, None])[:, 0])
        top = lp.topk(MAX_LOGPROBS, dim=-1)
        out.top_logprobs.copy_(top.values)
        out.top_ids.copy_(top.indices)


def _id_table(entries: list, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (token id, value) lists -> host ids [n, width] int64 and values [n, width] fp32,
    padded with (0, 0.0): a padding entry adds nothing where the table is scatter-added."""
    ids = torch.zeros(len(entries), width, dtype=torch.long)
    vals = torch.zeros(len(entries), width, dtype=torch.float32)
    for r, pairs in enumerate(entries):
        if pairs:
            ids[r, :len(pairs)] = torch.tensor([k for k, _ in pairs])
            vals[r, :len(pairs)] = torch.tensor([v for _, v in pairs])
    return ids, vals


def _uses_penalties(p: SamplingParams) -> bool:
    return p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting for the stream: pinned staging + non-blocking copy."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
