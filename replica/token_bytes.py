"""A token's own bytes, as it adds them to a text: what logprobs report per token.

Decoding one token alone is not that: a SentencePiece-style decoder strips the leading space of
a text ("▁world" alone is "world"), and a token holding part of a UTF-8 character (a byte-level
piece, or a byte-fallback token <0xE5>) decodes to U+FFFD, whose bytes are not the token's.
OpenAI's `bytes` field exists so that clients can rebuild such characters, so the bytes come from
the vocabulary, by the decoder family the tokenizer declares:
- byte-level (GPT-2, Llama 3, Qwen): each character of the piece stands for one byte
  (`byte_level_alphabet`);
- SentencePiece-style (Llama 2, Mistral): "<0xNN>" is byte NN, "▁" is a space, the rest UTF-8;
- anything else: the token decoded alone.
Special tokens and ids past the vocabulary add nothing.
"""
from __future__ import annotations

import json
import re
from typing import Callable

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte -> the byte. Printable Latin-1 bytes
    stand for themselves; the other 68 map, in byte order, to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = (b for b in range(256) if b not in printable)
    out = {chr(b): b for b in printable}
    out.update({chr(0x100 + n): b for n, b in enumerate(shifted)})
    return out


def decoder_types(backend) -> set[str]:
    """The decoder types of a `tokenizers.Tokenizer`, a Sequence's members included."""
    found: set[str] = set()

    def walk(spec: dict) -> None:
        found.add(spec.get("type"))
        for member in spec.get("decoders", ()):
            walk(member)
    try:
        walk(json.loads(backend.decoder.__getstate__()))
    except (AttributeError, TypeError, ValueError):   # no decoder, or no serialised form
        return set()
    return found


def token_bytes_for(hf_tokenizer) -> Callable[[int], bytes]:
    """`token_id -> bytes` for a Hugging Face tokenizer (fast or slow)."""
    special = set(hf_tokenizer.all_special_ids)
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    types = decoder_types(backend) if backend is not None else set()
    if "ByteLevel" in types:
        alphabet = byte_level_alphabet()

        def piece_bytes(piece: str) -> bytes:
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
            return piece.encode()                    # an added token, kept as written
    elif types & {"ByteFallback", "Metaspace"}:
        def piece_bytes(piece: str) -> bytes:
            m = _BYTE_TOKEN.fullmatch(piece)
            return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
    else:
        piece_bytes = None

    def token_bytes(token_id: int) -> bytes:
        piece = hf_tokenizer.convert_ids_to_tokens(token_id) if token_id >= 0 else None
        if piece is None or token_id in special:
            return b""
        if piece_bytes is None:
            return hf_tokenizer.decode([token_id], skip_special_tokens=True).encode()
        return piece_bytes(piece)
    return token_bytes
