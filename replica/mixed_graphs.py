"""Piecewise CUDA graphs of the mixed (prefill + decode) forward, for steps of few tokens.

A mixed step runs eagerly because its attention's launch grid follows the step's tile map. Eager
means every kernel of every layer is launched from Python: ~0.3 ms of host time per layer on an
H200 host, more than the GPU needs for a step of a few hundred tokens (llama-8b, 16 prompt tokens:
10 ms of launches for 6.5 ms of GPU work; llama-1b, 256 tokens: 5 ms for 1.7 ms;
results/mixed_step_probe-h200-2026-11-30.json). Those are the steps a chat turn's first token
waits on under light load.

So, as vLLM does with torch.compile's piecewise graphs, everything but attention is captured: for
each padded token count S (config.MIXED_LADDER up to `max_tokens`: 16, 32, 64, 128, 192, 256,
384, ...), L + 1 graphs over static buffers, split at each layer's attention:

    graph 0:      residual = embed(tokens); q = qkv(0, norm(residual))      -> q[:S], K/V stored
    eager:        a[:n] = attention(q[:n], layer 0, the step's tile map)     (n real tokens)
    graph i:      q = between(i - 1, a[:S], residual)                        i = 1 .. L - 1
    graph L:      hidden[S] = last(a[:S], residual)

Rows n..S-1 are padding: token 0 at position 0, K/V written to slot 0 (block 0 is the scratch
block, which no sequence reads); attention skips them (the tile map covers the n real rows), so
a[n:S] keeps stale finite values that only padding rows read. Logits (the step's sampled rows) are
one eager matmul over `hidden`. Same kernels, same order as `LlamaModel.forward_mixed` (cuBLAS
may pick another algorithm for S rows than for n, so bf16 logits agree within rounding; float32
tokens are equal: tests/gpu, and tests/unit runs the pieces eagerly on CPU).

Captured at startup, after the decode graphs and into their memory pool (a step never runs both at
once), so intermediate buffers are shared; what stays allocated is `q`, `a`, `residual` (sized for
`max_tokens`) and one `hidden` per size. On CPU, or with `max_tokens` 0, nothing is captured,
`fits` is None and `ModelRunner` runs the eager forward.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

from replica import kernels as K
from replica.config import MIXED_LADDER


def sizes_up_to(max_tokens: int) -> tuple[int, ...]:
    """Padded token counts captured: the MIXED_LADDER up to max_tokens."""
    return tuple(s for s in MIXED_LADDER if s <= max_tokens)


class MixedGraphs:
    def __init__(self, model, kv, max_tokens: int):
        """`max_tokens` 0 (CPU, graphs off, or configured so): no sizes, nothing captured."""
        self.model, self.kv = model, kv
        self.sizes = sizes_up_to(max_tokens)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        if not self.sizes:
            return
        s, top, dev = model.shape, self.sizes[-1], model.device
        self.cols = torch.zeros(3, top, dtype=torch.long, device=dev)   # tokens, positions, slots
        self.q = torch.zeros(top, s.num_heads, s.head_dim, dtype=model.dtype, device=dev)
        self.a = torch.zeros_like(self.q)
        self.residual = torch.zeros(top, s.hidden_size, dtype=model.dtype, device=dev)

    def fits(self, n: int) -> Optional[int]:
        """The captured size a step of n tokens runs at, or None (eager)."""
        return next((s for s in self.sizes if s >= n), None) if self.graphs else None

    @staticmethod
    def static_bytes(shape, max_tokens: int, dtype_bytes: int) -> int:
        """Memory the captured graphs keep (q, a, residual, and each size's hidden): for sizing."""
        sizes = sizes_up_to(max_tokens)
        if not sizes:
            return 0
        row = 2 * shape.num_heads * shape.head_dim + shape.hidden_size
        return (sizes[-1] * row + sum(sizes) * shape.hidden_size) * dtype_bytes

    # -- the pieces ---------------------------------------------------------------------------
    def _piece(self, i: int, size: int):
        """Piece i at `size` rows of the static buffers: the region graph i captures."""
        m, kv, q = self.model, self.kv, self.q[:size]
        tokens, positions, slots = self.cols[:, :size]
        a, residual = self.a[:size], self.residual[:size]
        layers = len(m.layers)
        if i == 0:
            residual.copy_(m.embed[tokens])
            h = K.rms_norm(residual, m.layers[0].ln1, m.shape.rms_eps)
            m.qkv(0, h, positions, slots, kv, q_out=q)
        elif i < layers:
            m.between(i - 1, a, residual, positions, slots, kv, q_out=q)
        else:
            self.hidden[size] = m.last(a, residual)

    def capture(self, pool, stream: torch.cuda.Stream) -> None:
        """Warm up and capture every size, largest first, on `stream` into `pool`."""
        if not self.sizes or self.model.device.type != "cuda":
            return
        t0 = time.perf_counter()
        self.cols.zero_()                     # padding everywhere: token 0, position 0, slot 0
        layers = len(self.model.layers)
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # compile outside the capture: pieces 2..L-1
                for i in sorted({0, 1, layers}):  # repeat piece 1's kernels at its shapes
                    self._piece(i, size)
            for size in reversed(self.sizes):
                graphs = []
                for i in range(layers + 1):
                    g = torch.cuda.CUDAGraph()
                    g.capture_begin(pool=pool)
                    try:
                        self._piece(i, size)
                    finally:
                        g.capture_end()
                    graphs.append(g)
                self.graphs[size] = graphs
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0

    # -- a step -------------------------------------------------------------------------------
    def run(self, size: int, tokens, positions, slots, meta, logit_rows,
            eager: bool = False) -> torch.Tensor:
        """The mixed forward of n = len(tokens) real rows at captured `size`: the same contract as
        `LlamaModel.forward_mixed`. Returns the logits [len(logit_rows), V]. `eager` runs the
        pieces instead of replaying them (tests on CPU: same buffers, same padding)."""
        m, kv, n = self.model, self.kv, tokens.shape[0]
        self.cols[:, n:size].zero_()
        for col, values in zip(self.cols, (tokens, positions, slots)):
            col[:n].copy_(values)
        piece = (lambda i: self._piece(i, size)) if eager else (lambda i: self.graphs[size][i].replay())
        piece(0)
        for i in range(len(m.layers)):
            K.paged_prefill_attention(self.q[:n], kv.k[i], kv.v[i], kv.block_tables, meta, m.scale,
                                      out=self.a[:n])
            piece(i + 1)
        return F.linear(self.hidden[size][logit_rows], m.lm_head)
