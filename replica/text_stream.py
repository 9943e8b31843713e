"""Token ids -> text, one step at a time: what a streamed completion's chunks are made of.

Contract (`TextStream`): `step(ids)` returns the text the new ids complete ("" while they end
inside a character, e.g. one byte token of a multi-byte UTF-8 character); `finish()` returns
what is still held back, incomplete characters as U+FFFD. The concatenation of every step and
`finish` is the text the ids add after `context` (the prompt's last tokens): for byte-level BPE
tokenizers that is `decode(ids)`; for SentencePiece-style ones (a leading "▁" is a space the
decoder strips at the start of a text) the first token keeps its space, as it does in
`decode(context + ids)`.

Three implementations, chosen by the tokenizer (replica/tokenizer.py):
- `Utf8Stream`: byte tokens through an incremental UTF-8 decoder (the random presets).
- `DecodeStreamText`: a Hugging Face fast tokenizer's own streaming decoder
  (`tokenizers.decoders.DecodeStream`, Rust): one call per id.
- `WindowStream`: any `decode(ids) -> str`, by decoding a short window twice per step (the text
  of the new ids is the difference), for tokenizers the above cannot serve (slow ones). Through
  the detokenizer it costs 2.4-3.3x the time per token of DecodeStreamText on a dev CPU
  (results/detok-cpu-2026-12-02.json, benchmarks/detok_bench.py), and a window that starts at a
  token decoding to nothing (a lone invalid byte, a special token) loses the next token's
  leading "▁" space under a stripping decoder.
"""
from __future__ import annotations

import codecs
from typing import Callable, Optional, Protocol, Sequence

# Prompt tokens a stream starts from: enough for the first new token's leading space, and for a
# character whose bytes began in the prompt (UTF-8 characters are at most 4 byte tokens).
CONTEXT_TOKENS = 4
REPLACEMENT = "\ufffd"
INVALID_PREFIX = "Invalid prefix encountered"   # DecodeStream's error when decoding is not monotonic


class TextStream(Protocol):
    def step(self, ids: Sequence[int]) -> str: ...

    def finish(self) -> str: ...


class Utf8Stream:
    """Byte tokens 0..255 through an incremental UTF-8 decoder; other ids decode to nothing."""

    def __init__(self, context: Sequence[int] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.step(context)           # only a character the context leaves open matters

    def step(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(bytes(i for i in ids if 0 <= i < 256))

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


class WindowStream:
    """`decode` over a window: the ids from `prefix` to `read` are already text; each step decodes
    the window with and without the new ids. A result ending in U+FFFD (or shorter) is an
    incomplete character: hold it until a later id completes it."""

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int] = ()):
        self._decode = decode
        self._ids = list(context)
        self._prefix, self._read = 0, len(self._ids)

    def step(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if not final and (after.endswith(REPLACEMENT) or len(after) < len(before)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]


class DecodeStreamText:
    """`tokenizers.decoders.DecodeStream` over a fast tokenizer's backend (`tokenizers.Tokenizer`),
    special tokens skipped, started from `context`. The ids it holds back since its last text are
    kept here too, so that `finish` can decode them (DecodeStream itself never gives them up)."""

    def __init__(self, backend, context: Sequence[int] = ()):
        from tokenizers.decoders import DecodeStream

        self._new_stream = lambda: DecodeStream(skip_special_tokens=True)
        self._backend = backend
        self._stream = self._new_stream()
        self._held: list[int] = []       # ids stepped in since the last text
        self.step(context)
        self._held = []                  # a character the context leaves open is not ours to flush

    def step(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            text = self._step_one(i)
            self._held.append(i)
            if text is not None:
                out.append(text)
                self._held = []
        return "".join(out)

    def finish(self) -> str:
        return self._backend.decode(self._held, skip_special_tokens=True) if self._held else ""

    def _step_one(self, i: int) -> Optional[str]:
        try:
            return self._stream.step(self._backend, i)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            if INVALID_PREFIX not in str(e):
                raise
        # Byte-fallback decoding is not monotonic: bytes that form no valid UTF-8 all become
        # U+FFFD, so a byte token already out alone (b"9" -> "9") decodes differently once an
        # invalid byte joins its run, and DecodeStream gives up. Start a new stream at the ids
        # after the text that is out. (The whole-text decode has U+FFFD where "9" went out.)
        self._stream = self._new_stream()
        try:
            texts = [self._stream.step(self._backend, j) for j in self._held + [i]]
        except Exception as e:  # noqa: BLE001
            if INVALID_PREFIX not in str(e):
                raise
            self._stream = self._new_stream()
            return self._backend.decode(self._held + [i], skip_special_tokens=True)
        return "".join(t for t in texts if t is not None) or None
