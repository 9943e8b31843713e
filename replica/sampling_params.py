"""Per-request generation parameters and the request/result types of the engine API.

`SamplingParams` is validated at construction and raises `InvalidRequestError` (a ValueError) with a
message fit to show a user; the HTTP layer maps it to a 400. Everything here is plain Python: the
types cross process boundaries (Ray handles) and must not pull in torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence


class InvalidRequestError(ValueError):
    """A request the engine cannot run as asked (bad parameter, prompt too long, ...)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0      # 0 = greedy
    top_k: int = 0                # 0 = no top-k cut
    top_p: float = 1.0            # 1 = no nucleus cut
    seed: Optional[int] = None    # None: the engine draws one; the same seed gives the same tokens
    stop: tuple[str, ...] = ()    # stop strings; the text stops before the first match
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise InvalidRequestError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any((not isinstance(s, str)) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a non-empty string or a list of non-empty strings")
        if len(self.stop) > 16:
            raise InvalidRequestError(f"at most 16 stop strings are supported, got {len(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. Give `prompt` (text) or `prompt_token_ids`, not both."""
    prompt: Optional[str] = None
    prompt_token_ids: Optional[Sequence[int]] = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise InvalidRequestError("give exactly one of prompt or prompt_token_ids")
        if self.prompt_token_ids is not None:
            ids = tuple(int(t) for t in self.prompt_token_ids)
            if not ids:
                raise InvalidRequestError("prompt_token_ids is empty")
            object.__setattr__(self, "prompt_token_ids", ids)


@dataclass(frozen=True)
class GenerationChunk:
    """What one engine step produced for one request; the last chunk has finish_reason set.

    finish_reason: None while running; "stop" (EOS, stop token or stop string), "length"
    (max_tokens or max_seq_len reached) or "abort" (cancelled).
    """
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
