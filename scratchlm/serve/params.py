"""What a request asks for: :class:`SamplingParams`, named as in the OpenAI completions API.

Every field is checked when the object is made, so a bad request fails alone, with a message that
says what was expected, before it reaches the engine (the engine keeps serving everyone else). The
sampling values go through :func:`~scratchlm.generate.sampling.check_sampling`, the one check that
``scratchlm sample`` and ``scratchlm generate`` use too. The defaults are the OpenAI completions API's
(16 tokens at temperature 1, as vLLM's); the command line's are ``scratchlm.cli.flags``'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from scratchlm.config import Rule
from scratchlm.generate.sampling import SamplingConfig, check_sampling


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
        _RULES["stop"].require(self.stop, "stop")
        _RULES["stop_token_ids"].require(self.stop_token_ids, "stop_token_ids")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        check_sampling(
            {
                "max_new_tokens": self.max_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "top_k": self.top_k,
                "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty,
            },
            names={"max_new_tokens": "max_tokens"},
        )
        _RULES["stop strings"].require(self.stop, "stop")
        _RULES["stop ids"].require(self.stop_token_ids, "stop_token_ids")
        for name in ("seed", "logprobs"):
            if getattr(self, name) is not None:
                _RULES[name].require(getattr(self, name), name)
        _RULES["ignore_eos"].require(self.ignore_eos, "ignore_eos")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def processors(self) -> SamplingConfig:
        """The logit processors of :mod:`scratchlm.generate.sampling` (the one-request path's own)."""
        return SamplingConfig(
            0.0 if self.greedy else self.temperature,
            self.top_k or None,
            self.top_p if self.top_p < 1 else None,
            self.min_p or None,
            self.repetition_penalty,
        )

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


# What the other fields allow (scratchlm.config.Rule: the one validation helper).
_RULES = {
    "stop": Rule(type=(list, tuple), expected="a string or a list of strings"),
    "stop_token_ids": Rule(type=(list, tuple), expected="a list of token ids"),
    "stop strings": Rule(
        test=lambda v: all(isinstance(s, str) and s for s in v), expected="a list of non-empty strings"
    ),
    "stop ids": Rule(
        test=lambda v: all(_integer(t) and t >= 0 for t in v), expected="a list of token ids >= 0"
    ),
    "seed": Rule(type=int, min=0, below=2**63, expected="an integer in [0, 2**63)"),
    "logprobs": Rule(type=int, min=0, max=20),
    "ignore_eos": Rule(type=bool),
}
