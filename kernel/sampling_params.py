"""Sampling parameters of one generate call. Torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from agentos.kernel.errors import InvalidRequestError

# every generated token is matched against every stop string (the text near its end), so
# these bound the matching work per token; OpenAI takes 4 stops, vLLM any number
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # biased tokens per call (OpenAI allows 300)
MAX_TOP_LOGPROBS = 20  # alternatives reported per token (OpenAI's limit)


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 (or -1, as vLLM writes it) = off
    min_p: float = 0.0  # drop tokens below min_p times the likeliest one's probability; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the session; 1 = off
    presence_penalty: float = 0.0  # subtracted from tokens this call already produced
    frequency_penalty: float = 0.0  # subtracted once per time this call produced the token
    seed: int | None = None  # reseeds the session's RNG before this call; None continues it
    stop: list[str] = field(default_factory=list)  # stop strings (not included in text)
    stop_token_ids: list[int] = field(default_factory=list)  # stop on these (kept in tokens)
    ignore_eos: bool = False  # do not stop at the model's end-of-sequence tokens
    logprobs: bool = True  # report the logprob of each chosen token
    # added to these tokens' logits before any choice (greedy too); -100 bans, 100 forces
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int = 0  # also report the k likeliest tokens and their logprobs per token
    # a constraint on the text (at most one; see kernel/grammar.py): a JSON schema (True:
    # any JSON object), a Lark grammar or a regex. The session keeps it open across calls
    json_schema: dict | bool | None = None
    grammar: str | None = None
    regex: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
               and self.temperature >= 0, f"temperature must be a finite number >= 0, got {self.temperature}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= -1,
               f"top_k must be an integer >= 0 (or -1: off), got {self.top_k!r}")
        self.top_k = max(self.top_k, 0)
        _check(_number(self.min_p) and 0 <= self.min_p <= 1,
               f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_number(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_number(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        _check(self.seed is None or isinstance(self.seed, int) and 0 <= self.seed < 2**63,
               f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty")
        _check(len(self.stop) <= MAX_STOPS and all(len(s) <= MAX_STOP_CHARS for s in self.stop),
               f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
               f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        self.logit_bias = _logit_bias(self.logit_bias)
        _check(isinstance(self.top_logprobs, int) and not isinstance(self.top_logprobs, bool)
               and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        self.constraint  # noqa: B018 (validates)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def constraint(self) -> str | None:
        """The llguidance grammar of the call's constraint, or None."""
        from agentos.kernel.grammar import grammar_of

        return grammar_of(self.json_schema, self.grammar, self.regex)

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the tokens so far (the sampler needs them)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _logit_bias(bias) -> dict[int, float]:
    """{token id: bias}; OpenAI's JSON has the ids as strings."""
    if not bias:
        return {}
    _check(isinstance(bias, dict) and len(bias) <= MAX_LOGIT_BIAS,
           f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} entries")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key) if not isinstance(key, bool) else -1
        except (TypeError, ValueError):
            token = -1
        _check(token >= 0, f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        _check(_number(value) and -100 <= value <= 100,
               f"logit_bias values must be in [-100, 100], got {value!r} for token {token}")
        out[token] = float(value)
    return out


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)
