"""Tokenizers: the byte-level one of the random presets, and Hugging Face's for checkpoints.

Both expose the small surface the engine and the ingress use: `encode(text) -> list[int]`,
`decode(ids) -> str`, `stream(context) -> TextStream` (a request's text, step by step:
replica/text_stream.py), `token_bytes(id) -> bytes` (what one token adds to a text:
replica/token_bytes.py), `eos_token_ids`, and `chat_ids(messages) -> list[int]`. `load_tokenizer(model)`
loads only the tokenizer (no weights), so the ingress can count tokens cheaply.
"""
from __future__ import annotations

import os
from typing import Sequence

from replica.config import ConfigError
from replica.presets import is_random
from replica.sampling_params import InvalidRequestError
from replica.text_stream import DecodeStreamText, TextStream, Utf8Stream, WindowStream
from replica.token_bytes import token_bytes_for

BOS, EOS, PAD = 256, 257, 258


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; 256/257/258 are <bos>/<eos>/<pad>. Ids past 258 (random
    presets with a large vocabulary) decode to nothing."""
    eos_token_ids: tuple[int, ...] = (EOS,)
    bos_token_id = BOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def stream(self, context: Sequence[int] = ()) -> TextStream:
        return Utf8Stream(context)

    def token_bytes(self, token_id: int) -> bytes:
        return bytes((token_id,)) if 0 <= token_id < 256 else b""

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """A plain-text template: '<role>: <content>\\n' per message, then 'assistant: '."""
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return [BOS] + self.encode(text)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from the checkpoint directory (offline)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eos = self._tok.eos_token_id
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        self._backend = _streaming_backend(self._tok)
        self.token_bytes = token_bytes_for(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's own decode, special tokens skipped. Never transformers' clean-up of
        spaces before punctuation (a WordPiece-era post-process that corrupts BPE text, and that
        transformers itself now skips for BPE), so that it agrees with `stream`."""
        return self._tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def stream(self, context: Sequence[int] = ()) -> TextStream:
        if self._backend is not None:
            return DecodeStreamText(self._backend, context)
        return WindowStream(self.decode, context)

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        if not getattr(self._tok, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions instead")
        out = self._tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in newer transformers
            out = out["input_ids"]
        return list(out)


def _streaming_backend(tok):
    """The `tokenizers.Tokenizer` whose DecodeStream gives `HFTokenizer.decode`'s text, or None
    for a slow (Python) tokenizer or a tokenizers release without DecodeStream (before 0.21)."""
    try:
        from tokenizers import decoders
    except ImportError:
        return None
    if not hasattr(decoders, "DecodeStream") or not getattr(tok, "is_fast", False):
        return None
    return getattr(tok, "backend_tokenizer", None)


def load_tokenizer(model: str):
    if is_random(model):
        return ByteTokenizer()
    if not os.path.isdir(model):
        raise ConfigError(f"model {model!r} is neither a local checkpoint directory nor 'random:<preset>' "
                          "(graphserve never downloads at run time: download the checkpoint first)")
    return HFTokenizer(model)
