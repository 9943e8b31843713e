"""Per-request generation parameters and the request/result types of the engine API.

`SamplingParams` is validated at construction and raises `InvalidRequestError` (a ValueError) with a
message fit to show a user, and the name of the offending field in `.param`; the HTTP layer maps it
to a 400. Types are strict: a bool is not an int, a string is not a number. Everything here is
plain Python: the types cross process boundaries (Ray handles) and must not pull in torch.

Semantics of the sampling extras (all applied inside the sampling graph, per row):
- `logprobs`: None = off; k in 0..20 = return the chosen token's log-probability and the k most
  likely alternatives. Log-probabilities are of the raw model distribution: log_softmax of the
  logits before temperature, penalties, bias and truncation (vLLM's default).
- `presence_penalty` / `frequency_penalty` (OpenAI): subtract `presence` once and `frequency` per
  occurrence for every token already *generated* by this request.
- `repetition_penalty` (vLLM/HF): every token seen in the prompt or the output has its logit
  divided by the penalty when positive, multiplied when negative. 1 = off.
- `logit_bias`: {token id: bias in [-100, 100]} added to the logits, up to 300 entries.
- `min_p`: drop tokens whose probability (after temperature) is below `min_p` x the top token's.
- `min_tokens` (vLLM): until this many tokens are generated, EOS (unless `ignore_eos`) and
  `stop_token_ids` cannot be drawn (their logits are -inf) and stop strings are not matched.
  `max_tokens` and `max_seq_len` still end a request sooner.
Order: bias -> min_tokens bans -> penalties -> temperature -> top-k / top-p / min-p -> draw.
Greedy rows (temperature 0) take the argmax after bias, bans and penalties.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Sequence

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_EOS_IDS = 16                                       # a model's EOS ids that min_tokens can hold back
MIN_TOKENS_BANS = MAX_STOP_TOKEN_IDS + MAX_EOS_IDS     # token ids a min_tokens row holds back, at most


class InvalidRequestError(ValueError):
    """A request the engine cannot run as asked (bad parameter, prompt too long, ...).

    `param` names the request field at fault when there is one (OpenAI's error `param`)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param = param
        self.code = code

    def __reduce__(self):  # keep param/code when pickled across a Ray handle or a process
        return (type(self), (str(self), self.param, self.code))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0           # no EOS, stop token or stop string before this many tokens
    temperature: float = 1.0      # 0 = greedy
    top_k: int = 0                # 0 = no top-k cut
    top_p: float = 1.0            # 1 = no nucleus cut
    min_p: float = 0.0            # 0 = off
    seed: Optional[int] = None    # None: the engine draws one; the same seed gives the same tokens
    stop: tuple[str, ...] = ()    # stop strings; the text stops before the first match
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None          # None = off; 0..20 alternatives per token
    presence_penalty: float = 0.0           # [-2, 2]
    frequency_penalty: float = 0.0          # [-2, 2]
    repetition_penalty: float = 1.0         # (0, 2]; 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()   # ((token id, bias), ...), sorted by id

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((k, v) for k, v in bias)))
        _validate(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @cached_property       # read for every row of every step; the params never change
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes or reports the distribution: argmax of the raw logits."""
        return (self.greedy and self.logprobs is None and not self.logit_bias
                and self.presence_penalty == 0 and self.frequency_penalty == 0
                and self.repetition_penalty == 1 and self.min_tokens == 0)


def _validate(p: SamplingParams) -> None:
    def fail(param: str, msg: str) -> None:
        raise InvalidRequestError(msg, param)

    if not _is_int(p.max_tokens) or p.max_tokens < 1:
        fail("max_tokens", f"max_tokens must be a positive integer, got {p.max_tokens!r}")
    if not _is_int(p.min_tokens) or not 0 <= p.min_tokens <= p.max_tokens:
        fail("min_tokens", f"min_tokens must be an integer in [0, max_tokens={p.max_tokens}], "
                           f"got {p.min_tokens!r}")
    for name, lo, hi in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0),
                         ("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0),
                         ("repetition_penalty", 0.0, 2.0)):
        v = getattr(p, name)
        if not _is_number(v) or not lo <= v <= hi:
            fail(name, f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    if p.top_p == 0.0:
        fail("top_p", "top_p must be in (0, 1], got 0")
    if p.repetition_penalty == 0.0:
        fail("repetition_penalty", "repetition_penalty must be in (0, 2], got 0")
    if not _is_int(p.top_k) or p.top_k < 0:
        fail("top_k", f"top_k must be a non-negative integer (0 disables it), got {p.top_k!r}")
    if p.seed is not None and not (_is_int(p.seed) and 0 <= p.seed < 2**63):
        fail("seed", f"seed must be an integer in [0, 2**63), got {p.seed!r}")
    if any((not isinstance(s, str)) or not s for s in p.stop):
        fail("stop", "stop must be a non-empty string or a list of non-empty strings")
    if len(p.stop) > MAX_STOP_STRINGS:
        fail("stop", f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(p.stop)}")
    if any(not _is_int(t) or t < 0 for t in p.stop_token_ids):
        fail("stop_token_ids", "stop_token_ids must be non-negative integers")
    if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        fail("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(p.stop_token_ids)}")
    if not isinstance(p.ignore_eos, bool):
        fail("ignore_eos", f"ignore_eos must be a boolean, got {p.ignore_eos!r}")
    if p.logprobs is not None and not (_is_int(p.logprobs) and 0 <= p.logprobs <= MAX_LOGPROBS):
        fail("logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {p.logprobs!r}")
    if len(p.logit_bias) > MAX_LOGIT_BIAS:
        fail("logit_bias", f"logit_bias has {len(p.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
    ids = [k for k, _ in p.logit_bias]
    if len(set(ids)) != len(ids):
        fail("logit_bias", "logit_bias names a token id twice")
    for k, v in p.logit_bias:
        if not _is_int(k) or k < 0:
            fail("logit_bias", f"logit_bias keys must be non-negative token ids, got {k!r}")
        if not _is_number(v) or not -100.0 <= v <= 100.0:
            fail("logit_bias", f"logit_bias values must be numbers in [-100, 100], got {v!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. Give `prompt` (text) or `prompt_token_ids`, not both."""
    prompt: Optional[str] = None
    prompt_token_ids: Optional[Sequence[int]] = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise InvalidRequestError("give exactly one of prompt or prompt_token_ids", "prompt")
        if self.prompt_token_ids is not None:
            ids = tuple(self.prompt_token_ids)
            if not all(_is_int(t) for t in ids):
                raise InvalidRequestError("prompt token ids must be integers", "prompt")
            if not ids:
                raise InvalidRequestError("prompt_token_ids is empty", "prompt")
            object.__setattr__(self, "prompt_token_ids", ids)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the raw model distribution, and the `k`
    most likely tokens at that step (k = SamplingParams.logprobs), most likely first."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationChunk:
    """What one engine step produced for one request; the last chunk has finish_reason set.

    finish_reason: None while running; "stop" (EOS, stop token or stop string), "length"
    (max_tokens or max_seq_len reached) or "abort" (cancelled).
    logprobs: one entry per token in `token_ids` when the request asked for logprobs, else None.
    """
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: Optional[tuple[TokenLogprob, ...]] = None
    cached_tokens: int = 0       # prompt tokens served from the prefix cache (first chunk on)
