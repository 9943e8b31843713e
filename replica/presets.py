"""`random:<preset>` models: Llama-shaped configs with seeded random weights, no download.

`tiny` runs the CPU tests and the default app; `llama-1b` and `llama-8b` have the shapes of
Llama-3.2-1B and Llama-3.1-8B for benchmarks. Their tokenizer is byte-level (replica/tokenizer.py),
so the tiny model's vocabulary is just the bytes plus three specials, and its output is visible text.
"""
from __future__ import annotations

from transformers import LlamaConfig

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
}


def is_random(model: str) -> bool:
    return model.startswith(PREFIX)


def preset_config(model: str, max_seq_len: int) -> LlamaConfig:
    """The HF LlamaConfig of a random preset; raises ConfigError naming the presets."""
    name = model[len(PREFIX):]
    if name not in PRESETS:
        raise ConfigError(f"unknown random preset {name!r}; choose one of "
                          f"{', '.join(PREFIX + p for p in PRESETS)}")
    return LlamaConfig(**PRESETS[name], max_position_embeddings=max(max_seq_len, 2048),
                       bos_token_id=256, eos_token_id=257, pad_token_id=258, rms_norm_eps=1e-5)
