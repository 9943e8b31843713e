"""`min_tokens` (vLLM's extension): no EOS, stop token or stop string before that many tokens.

Checked against HF transformers' own `generate(min_new_tokens=...)` for greedy tokens, in the
sampler's tables on fixed logits, through the EOS path, through stop strings, and as a field of
the HTTP request types."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from engine_helpers import run
from replica import Engine, EngineConfig, GenerationRequest, SamplingParams
from replica.sampling import SamplingTables
from replica.sampling_params import MAX_EOS_IDS, InvalidRequestError
from hf_fixtures import EOS


def _chunks(eng, ids, **params):
    async def go():
        req = GenerationRequest(prompt_token_ids=ids, params=SamplingParams(**params))
        return [c async for c in eng.generate(req)]
    return run(go())


def _tokens(chunks):
    return [t for c in chunks for t in c.token_ids]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = Engine(EngineConfig(model=tiny_llama_dir[0], device="cpu", dtype="float32", max_seq_len=128,
                              batch_buckets=(1, 2, 4), block_size=8, step_token_budget=5))
    yield eng
    eng.shutdown()


def test_validation_names_the_field():
    for bad in (-1, 1.5, True, 17):
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(max_tokens=16, min_tokens=bad)
        assert e.value.param == "min_tokens"
    assert SamplingParams(max_tokens=16, min_tokens=16).min_tokens == 16
    assert not SamplingParams(temperature=0.0, min_tokens=2).plain_greedy   # it needs the full sampler


def test_tables_hold_stop_ids_back_until_min_tokens():
    V = 40
    tables = SamplingTables(3, V, torch.device("cpu"))
    params = [SamplingParams(min_tokens=3), SamplingParams(), SamplingParams(min_tokens=2)]
    # row 0 holds back 5 and 7 (99 is past the vocabulary: never drawn, so dropped); row 1 has no
    # min_tokens; row 2 has min_tokens and nothing to hold back (ignore_eos, no stop ids)
    tables.write([0, 1, 2], params, [0, 0, 0], [[1], [1], [1]], [[], [], []],
                 [frozenset({5, 7, 99}), frozenset({5}), frozenset()])
    raw = torch.randn(3, V)
    for step in range(5):
        got = tables.processed(raw, torch.arange(3), torch.full((3,), step))
        held = step < 3
        for t in range(V):
            want = -math.inf if (held and t in (5, 7)) else raw[0, t].item()
            assert got[0, t].item() == want, (step, t)
        assert torch.equal(got[1:], raw[1:])


def test_greedy_matches_hf_generate_with_min_new_tokens(engine, tiny_llama_dir):
    _, hf = tiny_llama_dir
    prompt = [5, 17, 99, 3]
    plain = _tokens(_chunks(engine, prompt, max_tokens=12, temperature=0.0, ignore_eos=True))
    stop = plain[1]                       # the stop token comes early without min_tokens
    early = _tokens(_chunks(engine, prompt, max_tokens=12, temperature=0.0, ignore_eos=True,
                            stop_token_ids=[stop]))
    assert early == plain[:2]
    for k in (3, 6):
        chunks = _chunks(engine, prompt, max_tokens=12, temperature=0.0, ignore_eos=True,
                         stop_token_ids=[stop], min_tokens=k)
        got = _tokens(chunks)
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=12, min_new_tokens=k, do_sample=False, eos_token_id=stop,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref, k
        assert len(got) > k and stop not in got[:k]
        assert chunks[-1].finish_reason == ("stop" if got[-1] == stop else "length")


def test_eos_is_held_back_then_ends_the_request(engine):
    # A +100 bias makes EOS the argmax at every step: it ends the request as soon as min_tokens allows.
    chunks = _chunks(engine, [1, 2, 3], max_tokens=10, temperature=0.0, logit_bias={EOS: 100.0}, min_tokens=4)
    toks = _tokens(chunks)
    assert len(toks) == 5 and EOS not in toks[:4] and toks[4] == EOS
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 5
    sampled = _chunks(engine, [1, 2, 3], max_tokens=10, temperature=1.0, seed=3, logit_bias={EOS: 100.0},
                      min_tokens=4)
    assert len(_tokens(sampled)) == 5 and _tokens(sampled)[4] == EOS
    assert _tokens(_chunks(engine, [1, 2, 3], max_tokens=10, temperature=0.0, logit_bias={EOS: 100.0})) == [EOS]


def test_stop_strings_wait_for_min_tokens(engine):
    a = ord("a")          # the byte tokenizer: token id = byte
    kw = dict(max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias={a: 100.0}, stop=["a"])
    assert "".join(c.text for c in _chunks(engine, [1, 2], **kw)) == ""
    chunks = _chunks(engine, [1, 2], **kw, min_tokens=3)
    # the third token's "a" is the first match looked for: the text ends before it
    assert "".join(c.text for c in chunks) == "aa"
    assert chunks[-1].finish_reason == "stop"


def test_more_held_ids_than_the_table_is_a_400_naming_min_tokens(engine, monkeypatch):
    # a model declaring more EOS ids than the sampler's table holds back with 64 stop ids
    monkeypatch.setattr(engine, "info", dataclasses.replace(engine.info, num_eos_ids=MAX_EOS_IDS + 1))
    with pytest.raises(InvalidRequestError) as e:
        _chunks(engine, [1], max_tokens=4, min_tokens=2, stop_token_ids=list(range(64)))
    assert e.value.param == "min_tokens"
    assert len(_tokens(_chunks(engine, [1], max_tokens=4, min_tokens=2, stop_token_ids=list(range(64)),
                               ignore_eos=True))) >= 2     # without EOS they fit
