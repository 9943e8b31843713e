"""replica/mixed_graphs.py on CPU: the pieces it captures, run eagerly over its padded static
buffers, compute what the eager mixed forward computes (prefill chunks and decode rows, every
captured size, padding rows on the scratch block), and the sizing rule picks the sizes."""
from __future__ import annotations

import pytest
import torch

from replica import EngineConfig
from replica import kernels as K
from replica.mixed_graphs import MixedGraphs, sizes_up_to
from replica.models.llama import ModelShape
from replica.presets import preset_config
from replica.sizing import mixed_graph_tokens
from replica.worker import EngineCore


def _core():
    return EngineCore(EngineConfig(model="random:tiny", device="cpu", dtype="float32", max_seq_len=256,
                                   batch_buckets=(1, 2, 4), block_size=8, engine_process="thread"))


def _step(core, q_lens, prefixes, seed):
    """A mixed step over fresh table rows: chunk c has q_lens[c] tokens after prefixes[c] cached ones
    (written first by an eager prefill of its own)."""
    g = torch.Generator().manual_seed(seed)
    r, bs = core.runner, core.runner.kv.block_size
    kv_lens = [q + p for q, p in zip(q_lens, prefixes)]
    rows = list(range(len(q_lens)))
    next_block = 1                                        # block 0 is scratch
    for row, n in zip(rows, kv_lens):
        blocks = -(-n // bs)
        r.kv.block_tables[row, :blocks] = torch.arange(next_block, next_block + blocks, dtype=torch.int32)
        next_block += blocks
    positions = torch.cat([torch.arange(p, p + q) for q, p in zip(q_lens, prefixes)])
    tok_rows = torch.cat([torch.full((q,), row) for q, row in zip(q_lens, rows)])
    slots = r.kv.block_tables[tok_rows, positions // bs].long() * bs + positions % bs
    tokens = torch.randint(0, 250, (len(positions),), generator=g)
    for row, p in zip(rows, prefixes):                    # the cached prefixes' K/V
        if p:
            pos = torch.arange(p)
            pslots = r.kv.block_tables[row, pos // bs].long() * bs + pos % bs
            meta = K.PrefillMeta.build([p], [p], [row], "cpu")
            r.model.forward_mixed(torch.randint(0, 250, (p,), generator=g), pos, pslots, meta, r.kv,
                                  torch.tensor([p - 1]))
    meta = K.PrefillMeta.build(q_lens, kv_lens, rows, "cpu")
    last = torch.cumsum(torch.tensor(q_lens), 0) - 1
    return tokens, positions, slots, meta, last


@pytest.mark.parametrize("q_lens, prefixes", [([1, 1, 5], [9, 3, 0]), ([16], [0]), ([3, 20, 1], [0, 17, 30])])
def test_pieces_compute_the_eager_mixed_forward(q_lens, prefixes):
    core = _core()
    r = core.runner
    mg = MixedGraphs(r.model, r.kv, 64)
    assert mg.sizes == (16, 32, 64) and mg.fits(8) is None       # nothing captured on CPU
    with torch.inference_mode():
        tokens, positions, slots, meta, last = _step(core, q_lens, prefixes, seed=len(q_lens))
        want = r.model.forward_mixed(tokens, positions, slots, meta, r.kv, last)
        n = len(tokens)
        for size in [s for s in mg.sizes if s >= n]:
            caches = [t.clone() for t in (*r.kv.k, *r.kv.v)]
            for t in (*r.kv.k, *r.kv.v):
                t[0] = 0.0                                # scratch block: see what padding writes
            got = mg.run(size, tokens, positions, slots, meta, last, eager=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(mg.cols[:, n:size], torch.zeros_like(mg.cols[:, n:size]))  # padding
            for before, after in zip(caches, (*r.kv.k, *r.kv.v)):   # real blocks: the same K/V
                torch.testing.assert_close(after[1:], before[1:], rtol=1e-5, atol=1e-5)
            # padding rows (token 0 at position 0) wrote their K/V to slot 0 of the scratch block
            assert (size > n) == bool(r.kv.k[0][0, :, 0].abs().sum() > 0)


def test_sizes_and_the_sizing_rule():
    assert sizes_up_to(0) == () and sizes_up_to(15) == () and sizes_up_to(100) == (16, 32, 64)
    assert sizes_up_to(1100) == (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024)
    ladder = sizes_up_to(2048)                # a step pads by at most half from 128 tokens up
    assert all(b / a <= 1.5 for a, b in zip(ladder, ladder[1:]) if a >= 128)
    assert all(x % 16 == 0 for x in ladder)
    shape = lambda n: ModelShape.from_hf_config(preset_config(f"random:{n}", 2048))  # noqa: E731
    rule = lambda n, **kw: mixed_graph_tokens(EngineConfig(**kw), shape(n).matmul_params,  # noqa: E731
                                               shape(n).num_layers, cuda=True)
    # matmuls of 0.3 ms x layers at 750 TFLOP/s: llama-8b 480 tokens, llama-1b 1456, qwen2-0.5b 4285
    assert (rule("llama-8b"), rule("llama-1b"), rule("qwen2-7b"), rule("qwen2-0.5b")) == (384, 1024, 384, 2048)
    assert rule("llama-8b", mixed_graph_tokens=64) == 64 and rule("llama-8b", mixed_graph_tokens=0) == 0
    assert mixed_graph_tokens(EngineConfig(), shape("llama-8b").matmul_params, 32, cuda=False) == 0
    s = shape("llama-8b")
    kept = MixedGraphs.static_bytes(s, 384, 2)
    assert kept == (384 * (2 * 4096 + 4096) + (16 + 32 + 64 + 128 + 192 + 256 + 384) * 4096) * 2


def test_cpu_engine_never_takes_the_graph_path():
    core = _core()
    assert core.runner.mixed_tokens == 0 and core.runner.mixed.sizes == ()


class _EagerPieces(MixedGraphs):
    """The graph path as ModelRunner takes it, with each piece run eagerly (CPU has no graphs)."""

    def fits(self, n):
        return next((s for s in self.sizes if s >= n), None)

    def run(self, size, *args, eager=False):
        return super().run(size, *args, eager=True)


def test_the_runner_through_the_pieces_matches_hf(tiny_llama_dir):
    """ModelRunner's mixed path through MixedGraphs (pieces run eagerly): prompt chunks over a small
    step budget, decode rows whose last token is still on the device riding along, prefix-cache
    hits, steps above the largest size falling back to the eager forward; greedy tokens equal HF
    generate's."""
    import asyncio

    from engine_helpers import collect, run
    from replica import Engine
    from test_engine_vs_hf import hf_greedy

    path, hf = tiny_llama_dir
    eng = Engine(EngineConfig(model=path, device="cpu", dtype="float32", max_seq_len=128, block_size=8,
                              batch_buckets=(1, 2, 4, 8), step_token_budget=24, engine_process="thread"))
    try:
        r = eng.core.runner
        r.mixed = _EagerPieces(r.model, r.kv, 16)          # sizes (16,)
        shared = list(range(30, 62))                                        # 4 blocks of 8
        waves = [[shared + [5, 6], shared + list(range(100, 120))],          # 24-token steps: eager
                 [[3, 1, 4], [9] * 7, shared + [7, 8, 9]]]                  # small (cached prefix)

        async def go(prompts):
            return await asyncio.gather(*[collect(eng, ids=p, max_tokens=20, temperature=0.0,
                                                  ignore_eos=True) for p in prompts])
        for prompts in waves:
            for p, (toks, _, _) in zip(prompts, run(go(prompts))):
                assert toks == hf_greedy(hf, p, 20)
        s = eng.stats()
        assert 0 < s.mixed_graph_steps < s.mixed_steps      # both paths ran
        assert s.mixed_decode_rows > 0 and s.prefix_hit_tokens > 0
    finally:
        eng.shutdown()


def test_first_layers_runs_the_leading_layers_and_restores_the_stack():
    """`first_layers(1)` on the 2-layer tiny model computes what a model holding only layer 0
    computes (not the full stack), and the stack is back afterwards, after an error too."""
    from replica.models.llama import LlamaModel

    core = _core()
    r, m = core.runner, core.runner.model
    with torch.inference_mode():
        tokens, positions, slots, meta, last = _step(core, [7], [0], seed=3)
        full = m.forward_mixed(tokens, positions, slots, meta, r.kv, last)
        with m.first_layers(1) as short:
            assert len(short.layers) == 1
            one = m.forward_mixed(tokens, positions, slots, meta, r.kv, last)
        alone = LlamaModel(m.shape, m.embed, m.layers[:1], m.norm, m.lm_head, m.cos, m.sin)
        torch.testing.assert_close(one, alone.forward_mixed(tokens, positions, slots, meta, r.kv, last))
        assert not torch.allclose(one, full)
    assert len(m.layers) == 2
    with pytest.raises(RuntimeError), m.first_layers(1):
        raise RuntimeError("boom")
    assert len(m.layers) == 2
