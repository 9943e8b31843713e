"""Tiny Hugging Face checkpoints built offline for tests: a byte-level BPE tokenizer (no merges) and
a random LlamaForCausalLM saved with `save_pretrained`, so the engine's checkpoint path is exercised
end to end without a download."""
from __future__ import annotations

import torch

BOS, EOS = 256, 257
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    rest are shifted past 255 so every byte has a visible, whitespace-free symbol."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_chars().items()}
    vocab.update({"<s>": BOS, "</s>": EOS})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_llama(path, *, vocab_size: int = 300, seed: int = 0, tie: bool = False,
                    model_type: str = "llama", **config) -> "torch.nn.Module":
    """Save a random tiny model + tokenizer into `path`; returns the HF model (float32, eval).
    `model_type`: llama, mistral, qwen2 or qwen3; `config`: further config fields (rope_scaling, head_dim...)."""
    import transformers as tf

    classes = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}
    config_cls, model_cls = classes[model_type]
    torch.manual_seed(seed)
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
    byte_tokenizer().save_pretrained(path)
    return model
