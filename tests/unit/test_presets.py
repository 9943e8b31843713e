"""Random presets: each preset's config reads as its HF twin's (shape, layout), and the Qwen2
presets carry the layout the loader and kernels must honour (q/k/v bias, 7 query heads per KV
head, tied embeddings in the small one)."""
from __future__ import annotations

import pytest

from replica.config import ConfigError
from replica.models.llama import ModelShape
from replica.presets import PRESETS, hf_preset_config, preset_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_and_its_hf_twin_have_one_shape(name):
    ours = ModelShape.from_hf_config(preset_config(f"random:{name}", 4096))
    twin = hf_preset_config(f"random:{name}", 4096)
    assert ModelShape.from_hf_config(twin) == ours
    assert twin.model_type == PRESETS[name].get("model_type", "llama")


def test_qwen2_presets_have_the_qwen_layout():
    small = ModelShape.from_hf_config(preset_config("random:qwen2-0.5b", 2048))
    big = ModelShape.from_hf_config(preset_config("random:qwen2-7b", 2048))
    assert small.qkv_bias and big.qkv_bias
    assert (small.num_heads // small.num_kv_heads, small.head_dim, small.tie_embeddings) == (7, 64, True)
    assert (big.num_heads // big.num_kv_heads, big.head_dim, big.tie_embeddings) == (7, 128, False)
    assert small.rms_eps == 1e-6
    # Qwen2.5-7B: 7.07e9 in the layers + lm_head 0.54e9
    assert big.matmul_params == 28 * 3584 * (3584 + 2 * 512 + 3584 + 3 * 18944) + 152064 * 3584
    assert not ModelShape.from_hf_config(preset_config("random:llama-8b", 2048)).qkv_bias


def test_unknown_preset_names_the_presets():
    with pytest.raises(ConfigError, match="qwen2-7b"):
        preset_config("random:gpt-3", 2048)


def test_qwen3_preset_has_per_head_qk_norm_and_its_own_head_dim():
    s = ModelShape.from_hf_config(preset_config("random:qwen3-0.6b", 2048))
    assert s.qk_norm and not s.qkv_bias
    assert (s.head_dim, s.num_heads * s.head_dim, s.hidden_size) == (128, 2048, 1024)


def test_random_weights_give_qwen3_norms_one_entry_per_head_dim():
    import torch

    from replica.loader import _random_source

    shape = ModelShape.from_hf_config(preset_config("random:qwen3-0.6b", 64))
    get = _random_source(shape, torch.device("cpu"), torch.float32, 0)
    for name in ("q_norm", "k_norm"):
        assert get(f"model.layers.0.self_attn.{name}.weight").shape == (128,)
    assert get("model.layers.0.input_layernorm.weight").shape == (1024,)
