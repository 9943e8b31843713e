"""`random:<preset>` models: Llama-shaped configs with seeded random weights, no download.

`tiny` runs the CPU tests and the default app; `llama-1b` and `llama-8b` have the shapes of
Llama-3.2-1B and Llama-3.1-8B for benchmarks; `qwen2-0.5b` and `qwen2-7b` the Qwen2.5 layouts
(q/k/v bias, 7 query heads per KV head, head_dim 64 in the small one) so that benchmarks and GPU
tests cover a layout the kernels were not tuned on; `qwen3-0.6b` Qwen3's (per-head q/k norm,
head_dim 128 apart from hidden / heads). Their tokenizer is byte-level (replica/tokenizer.py),
so the tiny model's vocabulary is just the bytes plus three specials, and its output is visible text.

`preset_config` returns a plain namespace with the attribute names of a transformers LlamaConfig
(default RoPE, no scaling), so an engine on a random preset never imports transformers (about 2 s
of an engine process's start-up); `hf_preset_config` builds the real LlamaConfig for HF twins.
"""
from __future__ import annotations

from types import SimpleNamespace

from replica.config import ConfigError

PREFIX = "random:"
BYTE_VOCAB = 259  # 256 bytes + <bos> <eos> <pad>

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=BYTE_VOCAB, tie_word_embeddings=False),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                     tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


def is_random(model: str) -> bool:
    return model.startswith(PREFIX)


def _preset_fields(model: str, max_seq_len: int) -> dict:
    name = model[len(PREFIX):]
    if name not in PRESETS:
        raise ConfigError(f"unknown random preset {name!r}; choose one of "
                          f"{', '.join(PREFIX + p for p in PRESETS)}")
    fields = dict(model_type="llama", rms_norm_eps=1e-5)
    fields.update(PRESETS[name])
    return dict(fields, max_position_embeddings=max(max_seq_len, 2048), bos_token_id=256,
                eos_token_id=257, pad_token_id=258)


def preset_config(model: str, max_seq_len: int) -> SimpleNamespace:
    """The config of a random preset (LlamaConfig's attribute names); raises ConfigError naming
    the presets."""
    fields = _preset_fields(model, max_seq_len)
    return SimpleNamespace(**{"rope_theta": 10000.0, "head_dim": None, "rope_scaling": None, **fields})


def hf_preset_config(model: str, max_seq_len: int):
    """The transformers config (LlamaConfig or Qwen2Config) of a random preset, for HF twins in
    tests and benchmarks."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    fields = _preset_fields(model, max_seq_len)
    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}.get(fields.pop("model_type"), LlamaConfig)
    return cls(**fields)
