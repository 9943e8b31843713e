"""The in-graph sampler: reproducible per seed, top-k/top-p never leave their support, and
temperature sampling follows softmax(logits / T) (a chi-square test with a fixed seed)."""
from __future__ import annotations

import asyncio
import pytest
import torch

from engine_helpers import collect, run
from replica import Engine, EngineConfig
from replica.sampling import draw, uniform_noise


def sample(x, temperature, top_k, top_p, seeds, steps, min_p=None):
    return draw(x, temperature, top_k, top_p, torch.zeros_like(top_p) if min_p is None else min_p, seeds, steps)


def _draw(logits, n, temperature=1.0, top_k=0, top_p=1.0, seed=1234, min_p=0.0):
    """n independent draws from one row of logits: n rows with distinct (seed, step) keys."""
    B = n
    rows = logits.expand(B, -1)
    return sample(rows, torch.full((B,), temperature), torch.full((B,), top_k, dtype=torch.long),
                  torch.full((B,), top_p), torch.full((B,), seed, dtype=torch.long), torch.arange(B),
                  min_p=torch.full((B,), min_p))


def test_noise_is_uniform_and_keyed():
    seeds = torch.tensor([1, 1, 2])
    steps = torch.tensor([0, 0, 0])
    ids = torch.arange(50000)[None, :].expand(3, -1)
    u = uniform_noise(seeds, steps, ids)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0.0 < u.min() and u.max() < 1.0
    # Each decile holds 10% of the draws within 1% (50,000 draws: sd of a decile share ~0.13%).
    counts = torch.histc(u[0], bins=10, min=0, max=1) / u.shape[1]
    assert torch.all((counts - 0.1).abs() < 0.01), counts


def test_temperature_sampling_matches_softmax_chi_square():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    T = 0.7
    n = 40000
    toks = _draw(logits, n, temperature=T)
    observed = torch.bincount(toks, minlength=12).double()
    expected = torch.softmax(logits[0].double() / T, dim=0) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 11 degrees of freedom: P(chi2 > 31.26) = 0.001. A sampler off by a few percent on any token fails.
    assert chi2 < 31.26, (chi2, observed, expected)


def test_wrong_distribution_would_fail_the_chi_square():
    """The bound can fail: the same test against softmax at a different temperature rejects."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    toks = _draw(logits, 40000, temperature=0.7)
    observed = torch.bincount(toks, minlength=12).double()
    expected = torch.softmax(logits[0].double() / 0.8, dim=0) * 40000
    assert float(((observed - expected) ** 2 / expected).sum()) > 31.26


def test_top_k_never_leaves_its_support():
    torch.manual_seed(1)
    logits = torch.randn(1, 64)
    for k in (1, 3, 10):
        toks = _draw(logits, 5000, temperature=1.5, top_k=k)
        support = set(torch.topk(logits[0], k).indices.tolist())
        assert set(toks.tolist()) <= support
        assert len(set(toks.tolist())) == k  # and it does use the whole support


def test_top_p_never_leaves_the_nucleus():
    torch.manual_seed(2)
    logits = torch.randn(1, 64) * 1.5
    for p in (0.2, 0.5, 0.9):
        toks = _draw(logits, 5000, temperature=1.0, top_p=p)
        probs, order = torch.sort(torch.softmax(logits[0].double(), 0), descending=True)
        before = probs.cumsum(0) - probs
        nucleus = set(order[before < p].tolist())
        assert set(toks.tolist()) <= nucleus
        assert len(set(toks.tolist())) == len(nucleus)


def test_min_p_keeps_exactly_the_tokens_above_the_threshold():
    torch.manual_seed(3)
    logits = torch.randn(1, 64) * 2
    for m in (0.05, 0.3):
        toks = _draw(logits, 5000, temperature=1.0, min_p=m)
        probs = torch.softmax(logits[0].double(), 0)
        support = set(torch.nonzero(probs >= m * probs.max()).flatten().tolist())
        assert set(toks.tolist()) <= support
        assert len(set(toks.tolist())) == len(support)


def test_greedy_rows_ignore_noise():
    logits = torch.randn(6, 30)
    toks = sample(logits, torch.zeros(6), torch.zeros(6, dtype=torch.long), torch.ones(6),
                  torch.arange(6), torch.arange(6))
    assert torch.equal(toks, logits.argmax(-1))


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="random:tiny", device="cpu", batch_buckets=(1, 2, 4), max_seq_len=96))
    yield eng
    eng.shutdown()


def test_seeded_requests_reproduce_regardless_of_batch(engine):
    kw = dict(ids=[1, 2, 3, 4], max_tokens=16, temperature=1.0, top_p=0.95, seed=77)
    alone = run(collect(engine, **kw))[0]

    async def crowded():  # same request among others, so it runs in another row and bucket
        others = [collect(engine, ids=[9] * (i + 1), max_tokens=10, temperature=1.0) for i in range(3)]
        return (await asyncio.gather(collect(engine, **kw), *others))[0]
    assert run(crowded())[0] == alone
    other_seed = run(collect(engine, **{**kw, "seed": 78}))[0]
    assert other_seed != alone
