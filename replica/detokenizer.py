"""A request's text and its stop strings, per request, on the async side of the engine.

Text comes from the tokenizer's `TextStream` (replica/text_stream.py), started from the prompt's
last tokens, so a new token's text is what it adds in context (its leading space included) and
a character split over several tokens appears once all of them are in.

Stop strings: emitted text never includes a stop string; text that could still become the start of
one is held back (at most the longest stop string minus one character). With `min_tokens`, stop
strings are looked for only once that many tokens are in (vLLM's rule).
"""
from __future__ import annotations

from typing import Optional, Sequence

from replica.text_stream import CONTEXT_TOKENS


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = (), min_tokens: int = 0,
                 context: Sequence[int] = ()):
        self._stream = tokenizer.stream(list(context[-CONTEXT_TOKENS:]))
        self.num_ids = 0            # token ids added
        self.text = ""              # all decoded text so far
        self.emitted = 0            # chars of self.text handed out
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.min_tokens = min_tokens

    def add(self, ids: Sequence[int]) -> None:
        self.num_ids += len(ids)
        self.text += self._stream.step(ids)

    def take(self, final: bool) -> tuple[str, Optional[str]]:
        """New text to emit, and the stop string matched (the text then ends before it)."""
        for s in self.stop if self.num_ids >= self.min_tokens else ():
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
        """The rest of the text, any held-back incomplete character included, for the final chunk."""
        self.text += self._stream.finish()
        return self.take(final=True)[0]
