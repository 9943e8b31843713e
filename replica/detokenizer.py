"""Incremental detokenisation and stop strings, per request, on the async side of the engine.

Decoding the whole output every step is O(n^2); decoding only the new token breaks multi-byte and
merged pieces. So we decode a short window twice: the ids from `prefix` to `read` (already emitted)
and from `prefix` to the end; the new text is the difference. A window ending in U+FFFD is an
incomplete UTF-8 sequence: hold it back until the next token completes it.

Stop strings: emitted text never includes a stop string; text that could still become the start of
one is held back (at most the longest stop string minus one character). With `min_tokens`, stop
strings are looked for only once that many tokens are in (vLLM's rule).
"""
from __future__ import annotations

from typing import Optional, Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = (), min_tokens: int = 0):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0             # window start (ids before it are settled)
        self.read = 0               # ids whose text is already in self.text
        self.text = ""              # all decoded text so far
        self.emitted = 0            # chars of self.text handed out
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.min_tokens = min_tokens

    def add(self, ids: Sequence[int]) -> None:
        self.ids.extend(ids)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) < len(before):
            return  # incomplete character: wait for the next token
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)

    def take(self, final: bool) -> tuple[str, Optional[str]]:
        """New text to emit, and the stop string matched (the text then ends before it)."""
        for s in self.stop if len(self.ids) >= self.min_tokens else ():
            at = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if at >= 0:
                out = self.text[self.emitted:at]
                self.emitted = at
                return out, s
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out, None

    def flush_all(self) -> str:
        """Text including any held-back incomplete tail, for the final chunk."""
        full = self.tok.decode(self.ids)
        if len(full) > len(self.text) and full.startswith(self.text):
            self.text = full
        return self.take(final=True)[0]
