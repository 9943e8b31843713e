"""Greedy tokens from the engine equal HF transformers' own `generate` on the same checkpoint, for a
batch of prompts of different lengths, and while requests join and leave mid-flight (chunked
prefill interleaved with decode, padding rows in every bucket)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine_helpers import collect, run
from replica import Engine, EngineConfig


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


PROMPTS = [[5, 17, 99], list(range(40, 80)), [7], list(range(100, 113)), [250, 3, 3, 3, 9, 1]]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    path, _ = tiny_llama_dir
    eng = Engine(EngineConfig(model=path, device="cpu", dtype="float32", batch_buckets=(1, 2, 4, 8),
                              max_seq_len=128, step_token_budget=7))
    yield eng
    eng.shutdown()


def test_batch_of_prompts_matches_hf_generate(engine, tiny_llama_dir):
    _, hf = tiny_llama_dir
    n = 12

    async def all_at_once():
        return await asyncio.gather(*[collect(engine, ids=p, max_tokens=n, temperature=0.0, ignore_eos=True)
                                      for p in PROMPTS])
    results = run(all_at_once())
    for prompt, (toks, _, reason) in zip(PROMPTS, results):
        assert toks == hf_greedy(hf, prompt, n), f"prompt {prompt[:5]}..."
        assert reason == "length"
    # The outputs differ between prompts, so the comparison is not vacuous.
    assert len({tuple(t) for t, _, _ in results}) == len(PROMPTS)


def test_requests_joining_and_leaving_mid_flight_match_hf(engine, tiny_llama_dir):
    _, hf = tiny_llama_dir
    plan = [(PROMPTS[1], 20, 0), (PROMPTS[0], 4, 2), (PROMPTS[3], 9, 3), (PROMPTS[2], 15, 6), (PROMPTS[4], 3, 6)]

    async def staggered():
        first_progress = asyncio.Queue()
        results = {}

        async def lead():  # request 0 reports its progress so the others can join at given steps
            toks = []
            from replica import GenerationRequest, SamplingParams
            req = GenerationRequest(prompt_token_ids=plan[0][0],
                                    params=SamplingParams(max_tokens=plan[0][1], temperature=0.0, ignore_eos=True))
            async for chunk in engine.generate(req):
                toks += chunk.token_ids
                await first_progress.put(len(toks))
            results[0] = toks

        async def follower(i):
            prompt, n, join_at = plan[i]
            results[i] = (await collect(engine, ids=prompt, max_tokens=n, temperature=0.0, ignore_eos=True))[0]

        tasks = [asyncio.create_task(lead())]
        pending = sorted(range(1, len(plan)), key=lambda i: plan[i][2])
        while pending:
            done = await first_progress.get()
            while pending and plan[pending[0]][2] <= done:
                tasks.append(asyncio.create_task(follower(pending.pop(0))))
        await asyncio.gather(*tasks)
        return results

    results = run(staggered())
    for i, (prompt, n, _) in enumerate(plan):
        assert results[i] == hf_greedy(hf, prompt, n), f"request {i}"
    steps = engine.stats().decode_steps
    assert len({b for b, _ in steps}) > 1, f"expected several buckets in use, got {steps}"


def test_text_prompt_goes_through_the_checkpoint_tokenizer(engine, tiny_llama_dir):
    _, hf = tiny_llama_dir
    ids = engine.tokenizer.encode("héllo")
    assert ids == [104, 195, 169, 108, 108, 111]
    toks, text, _ = run(collect(engine, prompt="héllo", max_tokens=5, temperature=0.0, ignore_eos=True))
    assert toks == hf_greedy(hf, ids, 5)
    assert text == engine.tokenizer.decode(toks)


def test_qwen2_layout_with_qkv_bias_matches_hf(tmp_path):
    from hf_fixtures import save_tiny_llama

    hf = save_tiny_llama(tmp_path, model_type="qwen2", seed=3)
    with torch.no_grad():  # non-zero biases, or the bias path is not tested
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    eng = Engine(EngineConfig(model=str(tmp_path), device="cpu", batch_buckets=(1, 2), max_seq_len=64))
    try:
        toks = run(collect(eng, ids=PROMPTS[3], max_tokens=8, temperature=0.0, ignore_eos=True))[0]
        assert toks == hf_greedy(hf, PROMPTS[3], 8)
    finally:
        eng.shutdown()


def test_qwen3_layout_with_per_head_qk_norm_matches_hf(tmp_path):
    """Qwen3: an RMSNorm over each query and key head before RoPE, head_dim apart from hidden /
    heads."""
    from hf_fixtures import save_tiny_llama

    hf = save_tiny_llama(tmp_path, model_type="qwen3", seed=4, head_dim=32)   # norms drawn in [0.3, 2]
    _assert_checkpoint_matches_hf(tmp_path, hf, (PROMPTS[3], LONG_PROMPT), 10)


def test_unimplemented_projection_biases_are_refused(tmp_path):
    """A Llama checkpoint with attention_bias (o_proj bias too) or mlp_bias: refused by name, not
    loaded with its biases dropped."""
    from hf_fixtures import save_tiny_llama

    from replica.config import ConfigError
    for flag in ("attention_bias", "mlp_bias"):
        save_tiny_llama(tmp_path / flag, seed=1, **{flag: True})
        with pytest.raises(ConfigError, match=flag):
            Engine(EngineConfig(model=str(tmp_path / flag), device="cpu", batch_buckets=(1,), max_seq_len=64))


LONG_PROMPT = [(7 * i + 3) % 250 for i in range(150)]   # positions past the original context below


@pytest.mark.parametrize("model_type, config", [
    # Llama 3.x rope: low frequencies scaled by `factor`, a smooth band between (positions here
    # run past original_max_position_embeddings, where the scaling shows)
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                   rope_theta=500000.0)),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("llama", dict(head_dim=32)),                       # head_dim != hidden_size / heads
    ("llama", dict(num_key_value_heads=4)),             # MHA, no grouping
    ("mistral", dict(sliding_window=None)),
], ids=["llama3-rope", "linear-rope", "head-dim-32", "mha", "mistral"])
def test_checkpoint_layouts_match_hf(tmp_path, model_type, config):
    """Layouts a user loads from the Hub: the rope variants go through HF's own rotary tables, the
    head dim and KV grouping through the paged kernels; tokens equal HF generate's."""
    from hf_fixtures import save_tiny_llama

    hf = save_tiny_llama(tmp_path, model_type=model_type, seed=5, **config)
    _assert_checkpoint_matches_hf(tmp_path, hf, (PROMPTS[1], LONG_PROMPT), 12)


def _assert_checkpoint_matches_hf(path, hf, prompts, max_tokens: int) -> None:
    """Greedy tokens of an engine on the checkpoint at `path` equal `hf`'s generate, per prompt."""
    eng = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32", batch_buckets=(1, 2),
                              max_seq_len=256, step_token_budget=64))
    try:
        for ids in prompts:
            toks = run(collect(eng, ids=ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True))[0]
            assert toks == hf_greedy(hf, ids, max_tokens), ids[:4]
    finally:
        eng.shutdown()
