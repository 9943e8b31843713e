"""Tiny Hugging Face checkpoints built offline for tests: a byte-level BPE tokenizer (no merges) and
a random LlamaForCausalLM saved with `save_pretrained`, so the engine's checkpoint path is exercised
end to end without a download; and BPE tokenizers trained here in the two decoder families real
checkpoints use (`trained_tokenizer`), for text that merges, strips and falls back to bytes."""
from __future__ import annotations

import torch

from replica.token_bytes import byte_level_alphabet

BOS, EOS = 256, 257
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(byte_level_alphabet())                  # GPT-2's stand-in character -> byte
    vocab.update({"<s>": BOS, "</s>": EOS})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_llama(path, *, vocab_size: int = 300, seed: int = 0, tie: bool = False,
                    model_type: str = "llama", tokenizer=None, **config) -> "torch.nn.Module":
    """Save a random tiny model + tokenizer into `path`; returns the HF model (float32, eval).
    `model_type`: llama, mistral, qwen2 or qwen3; `tokenizer`: the byte-level one by default (a
    larger one raises `vocab_size` to its length); `config`: further config fields (rope_scaling,
    head_dim...)."""
    import transformers as tf

    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}
    config_cls, model_cls = classes[model_type]
    torch.manual_seed(seed)
    vocab_size = max(vocab_size, len(tokenizer) if tokenizer is not None else 0)
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=tie,
                max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS, rms_norm_eps=1e-5)
    model = model_cls(config_cls(**{**dims, **config}))
    with torch.no_grad():  # HF initialises weights with std 0.02: sharpen them so greedy paths differ
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):   # Qwen3's: away from 1, or
                p.uniform_(0.3, 2.0)                                  # their weights go untested
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    (tokenizer or byte_tokenizer()).save_pretrained(path)
    return model


MULTILINGUAL = ("Größe und Übermaß, naïve café. Быстрая коричневая лиса. 日本語のテキストと漢字。"
                "한국어 문장입니다. Emoji: 😀🎉👍🏽 and ✓ ✗ → ∑ ≤ ≥. ")


def _corpus() -> list[str]:
    """The repository's README and engine docs (natural English, code, tables) and a multilingual
    line: enough for BPE merges that cross words, punctuation and multi-byte characters."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    docs = [root / "README.md", root / "docs" / "engine-internals.md", root / "docs" / "operations.md"]
    return [p.read_text() for p in docs] + [MULTILINGUAL * 20]


def trained_tokenizer(kind: str, vocab_size: int = 2000):
    """A BPE tokenizer trained here, in one of the two decoder families real checkpoints use:
    - "byte_level": GPT-2 / Llama 3 / Qwen (byte-level pre-tokenizer and decoder);
    - "sentencepiece": Llama 2 / Mistral (words start with "▁" for their space, byte-fallback
      tokens <0xNN> for what the vocabulary lacks, and Llama 2's decoder, which strips the text's
      leading space).
    Returns a `PreTrainedTokenizerFast` with <s> and </s> as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "byte_level":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "sentencepiece":
        tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                        decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=150,
                                      special_tokens=["<unk>", "<s>", "</s>"])
    else:
        raise ValueError(kind)
    tk.train_from_iterator(_corpus(), trainer)
    if kind == "sentencepiece":
        tk = _add_byte_tokens(tk)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


def _add_byte_tokens(tk):
    """`tk` with the 256 byte tokens <0x00>..<0xFF> as ordinary vocabulary entries, as
    SentencePiece has them (special tokens would vanish from a decode that skips them)."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"].update(byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    return Tokenizer.from_str(json.dumps(spec))
