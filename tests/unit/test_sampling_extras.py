"""Sampling extras (issue 9) inside the sampler: logprobs of the raw distribution vs HF's
log_softmax, penalties vs a float64 reference on fixed logits and vs an HF decode loop, logit
bias, and seeded reproducibility with every extra on."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine_helpers import run
from replica import Engine, EngineConfig, GenerationRequest, SamplingParams
from replica.sampling import SamplingTables


def _run(eng, ids, **params):
    async def go():
        toks, lps = [], []
        req = GenerationRequest(prompt_token_ids=ids, params=SamplingParams(**params))
        async for c in eng.generate(req):
            toks += c.token_ids
            lps += list(c.logprobs or ())
        return toks, lps
    return run(go())


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = Engine(EngineConfig(model=tiny_llama_dir[0], device="cpu", dtype="float32", max_seq_len=128,
                              batch_buckets=(1, 2, 4), block_size=8))
    yield eng
    eng.shutdown()


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].double()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_the_raw_distribution_of_hf(engine, tiny_llama_dir, temperature):
    _, hf = tiny_llama_dir
    prompt = [5, 17, 99, 3]
    toks, lps = _run(engine, prompt, max_tokens=6, temperature=temperature, seed=3, logprobs=5,
                     ignore_eos=True, presence_penalty=0.5)      # penalties must not change logprobs
    assert len(lps) == len(toks) == 6
    for i, (tok, lp) in enumerate(zip(toks, lps)):
        ref = torch.log_softmax(_hf_logits(hf, prompt + toks[:i]), -1)
        assert lp.token_id == tok
        assert abs(lp.logprob - float(ref[tok])) < 1e-3
        top = ref.topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - float(r)) for (_, v), r in zip(lp.top, top.values)) < 1e-3


def test_no_logprobs_unless_asked(engine):
    toks, lps = _run(engine, [1, 2], max_tokens=3, temperature=0.0)
    assert len(toks) == 3 and lps == []
    _, lps = _run(engine, [1, 2], max_tokens=3, temperature=0.0, logprobs=0)
    assert len(lps) == 3 and all(lp.top == () for lp in lps)


def _reference(raw, prompt, output, p):
    """float64 bias -> repetition -> presence/frequency, as vLLM and the OpenAI docs define them."""
    x = raw.double().clone()
    for k, v in p.logit_bias:
        x[k] += v
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=x.numel()).double() \
        if output else torch.zeros_like(x)
    seen = counts > 0
    if prompt:
        seen[torch.tensor(prompt)] = True
    x = torch.where(seen, torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
    return x - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts


def test_penalties_and_bias_match_a_float64_reference():
    torch.manual_seed(0)
    V = 50
    tables = SamplingTables(4, V, torch.device("cpu"))
    cases = [SamplingParams(repetition_penalty=1.3), SamplingParams(presence_penalty=1.5, frequency_penalty=0.4),
             SamplingParams(presence_penalty=-0.7, repetition_penalty=0.8, logit_bias={3: 5.0, 40: -2.5}),
             SamplingParams()]
    prompts = [[1, 2, 3], [7, 7, 8], [40], [9]]
    outputs = [[2, 2, 11], [8, 30, 30, 30], [3, 4], [1]]
    tables.write([0, 1, 2, 3], cases, [0] * 4, prompts, outputs, [frozenset({5})] * 4)
    raw = torch.randn(4, V) * 3
    got = tables.processed(raw, torch.arange(4), torch.zeros(4, dtype=torch.long))
    for r, p in enumerate(cases):
        if r == 3:   # no penalties: its (stale) counts are never read into the result
            torch.testing.assert_close(got[r].double(), raw[r].double(), rtol=0, atol=0)
            continue
        torch.testing.assert_close(got[r].double(), _reference(raw[r], prompts[r], outputs[r], p),
                                   rtol=1e-6, atol=1e-5)
    assert not torch.equal(got[1], raw[1])   # the reference comparison is not vacuous


def test_penalised_greedy_decoding_matches_an_hf_loop(engine, tiny_llama_dir):
    _, hf = tiny_llama_dir
    prompt = [10, 20, 30, 10, 20]
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.8,
                       presence_penalty=0.6, frequency_penalty=0.3)
    toks, _ = _run(engine, prompt, **{f: getattr(p, f) for f in
                                      ("max_tokens", "temperature", "ignore_eos", "repetition_penalty",
                                       "presence_penalty", "frequency_penalty")})
    ref = []
    for _ in range(12):
        x = _reference(_hf_logits(hf, prompt + ref), prompt, ref, p)
        ref.append(int(x.argmax()))
    assert toks == ref
    plain, _ = _run(engine, prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
    assert plain != toks, "the penalties changed nothing: the comparison would be vacuous"


def test_logit_bias_forces_and_bans_tokens(engine):
    toks, _ = _run(engine, [1, 2, 3], max_tokens=5, temperature=0.0, ignore_eos=True, logit_bias={42: 100.0})
    assert toks == [42] * 5
    plain, _ = _run(engine, [1, 2, 3], max_tokens=5, temperature=0.0, ignore_eos=True)
    banned = {t: -100.0 for t in set(plain)}
    toks, _ = _run(engine, [1, 2, 3], max_tokens=5, temperature=0.0, ignore_eos=True, logit_bias=banned)
    assert not set(toks) & set(plain)


def test_seeded_sampling_with_every_extra_reproduces_in_a_crowd(engine):
    kw = dict(max_tokens=10, temperature=0.9, top_p=0.9, top_k=40, min_p=0.02, seed=11, logprobs=3,
              presence_penalty=0.5, frequency_penalty=0.2, repetition_penalty=1.2, logit_bias={5: 2.0},
              ignore_eos=True)
    alone = _run(engine, [4, 5, 6], **kw)[0]

    async def crowded():
        async def one(ids, **params):
            req = GenerationRequest(prompt_token_ids=ids, params=SamplingParams(**params))
            return [t async for c in engine.generate(req) for t in c.token_ids]
        others = [one([9] * (i + 2), max_tokens=8, temperature=1.0) for i in range(3)]
        return (await asyncio.gather(one([4, 5, 6], **kw), *others))[0]
    assert run(crowded()) == alone
    assert _run(engine, [4, 5, 6], **{**kw, "seed": 12})[0] != alone
