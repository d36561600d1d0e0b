"""What a request asks for: :class:`SamplingParams`, named as in the OpenAI completions API.

Every field is checked when the object is made, so a bad request fails alone, with a message that
says what was expected, before it reaches the engine (the engine keeps serving everyone else).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from scratchlm.generate.sampling import SamplingConfig


@dataclass
class SamplingParams:
    max_tokens: int = 16  # generated tokens at most (the OpenAI completions default)
    temperature: float = 1.0  # 0 = greedy (so is anything below 1e-5: dividing by it overflows)
    top_p: float = 1.0  # nucleus: keep the most likely tokens whose probability reaches top_p
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off (CTRL's penalty on every token generated so far)
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # keep going after the tokenizer's end-of-text token
    seed: int | None = None  # a seeded request samples the same tokens alone or in any batch
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k most likely

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.stop, (list, tuple)), "stop", self.stop, "a string or a list of strings")
        _check(isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids", self.stop_token_ids,
               "a list of token ids")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(_integer(self.max_tokens) and self.max_tokens >= 1,
               "max_tokens", self.max_tokens, "an integer >= 1")
        _check(_number(self.temperature) and 0 <= self.temperature < float("inf"), "temperature", self.temperature,
               "a number >= 0 (0 = greedy)")
        _check(_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(_integer(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        _check(_number(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf"), "repetition_penalty",
               self.repetition_penalty, "a number > 0 (1 = off)")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "a list of non-empty strings")
        _check(all(_integer(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "a list of token ids >= 0")
        _check(self.seed is None or (_integer(self.seed) and 0 <= self.seed < 2**63), "seed", self.seed,
               "an integer in [0, 2**63)")
        _check(self.logprobs is None or (_integer(self.logprobs) and 0 <= self.logprobs <= 20), "logprobs",
               self.logprobs, "an integer in [0, 20]")

        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def processors(self) -> SamplingConfig:
        """The logit processors of :mod:`scratchlm.generate.sampling` (the one-request path's own)."""
        return SamplingConfig(0.0 if self.greedy else self.temperature, self.top_k or None, self.top_p if self.top_p < 1 else None,
                              self.min_p or None, self.repetition_penalty)

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """From a request's JSON fields; unknown names are an error (a typo must not be ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


GREEDY_BELOW = 1e-5  # temperatures below this are greedy (as in vLLM): logits / 1e-30 overflow to inf


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # and not NaN


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
