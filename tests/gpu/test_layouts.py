"""Head layouts the Triton kernels were not tuned on, on a real GPU (skipped without CUDA).

The CPU tests run these layouts through the torch reference kernels
(tests/unit/test_engine_vs_hf.py); here the paged decode and prefill attention, rope, the KV
store and Qwen3's per-head q/k norm are the Triton kernels, inside captured graphs. Each layout is a random HF checkpoint; in
float32 the engine's greedy tokens equal HF generate's on the device, and every pure-decode step
replays a graph. Prompts are long enough for the decode kernel to split and for the prefill to
take several key tiles.
"""
from __future__ import annotations

import pytest
import torch

from engine_helpers import assert_greedy_matches_hf, assert_steps_replayed_graphs
from replica import Engine, EngineConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYOUTS = {
    "mha-hd64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4),        # no grouping
    "group16-hd32": dict(hidden_size=512, num_attention_heads=16, num_key_value_heads=1),   # MQA
    "hd96": dict(hidden_size=384, num_attention_heads=4, num_key_value_heads=2),            # not a power of 2
    "hd128-not-hidden-over-heads": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=128),
    "hd256": dict(hidden_size=512, num_attention_heads=2, num_key_value_heads=1),           # Gemma's head size
    "qwen3-qk-norm": dict(model_type="qwen3", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=128),                                                    # per-head q/k norm
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_head_layouts_match_hf_generate_on_gpu(tmp_path, layout):
    from hf_fixtures import save_tiny_llama

    hf = save_tiny_llama(tmp_path, seed=13, intermediate_size=256, **LAYOUTS[layout]).to("cuda")
    eng = Engine(EngineConfig(model=str(tmp_path), device="cuda", dtype="float32", batch_buckets=(1, 2, 4, 8),
                              max_seq_len=512, block_size=16, max_num_seqs=8, kv_cache_bytes=64 << 20,
                              engine_process="thread"))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 256, (n,), generator=gen).tolist() for n in (3, 17, 40, 90)]
    prompts.append([(7 * i + 3) % 250 for i in range(300)])        # several splits and key tiles
    try:
        assert_greedy_matches_hf(eng, hf, prompts, max_tokens=20)
        assert_steps_replayed_graphs(eng)
    finally:
        eng.shutdown()
