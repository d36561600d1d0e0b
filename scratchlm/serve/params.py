"""What a request asks for: :class:`SamplingParams`, named as in the OpenAI completions API.

Every field is checked when the object is made, so a bad request fails alone, with a message that
says what was expected, before it reaches the engine (the engine keeps serving everyone else). The
sampling values go through :func:`~scratchlm.generate.sampling.check_sampling`, the one check that
``scratchlm sample`` and ``scratchlm generate`` use too. The defaults are the OpenAI completions API's
(16 tokens at temperature 1, as vLLM's); the command line's are ``scratchlm.cli.flags``'. A refused
value raises :class:`~scratchlm.serve.errors.InvalidRequestError` (a ``ValueError``) whose ``param``
names the field.

``n`` choices are sampled for one prompt (``best_of`` of them, keeping the ``n`` with the highest
cumulative log-probability). Choice ``i`` of a seeded request draws with seed ``seed + i``, so it
samples the same tokens as a request with ``n=1`` and that seed.

``output_kind`` says what each of the request's outputs holds (vLLM's ``RequestOutputKind``):
everything so far (``CUMULATIVE``), only what is new since the previous output (``DELTA``, what
streaming sends), or one output when the request finishes (``FINAL_ONLY``).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields

from scratchlm.config import Rule
from scratchlm.generate.sampling import SamplingConfig, check_sampling
from scratchlm.serve.errors import InvalidRequestError


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output holds all tokens, text and logprobs so far
    DELTA = 1  # every output holds only what is new since the previous one
    FINAL_ONLY = 2  # one output, when the request finishes


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
    n: int = 1  # choices returned
    best_of: int | None = None  # choices sampled (None: n); the n most likely are returned
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _require("stop", self.stop, "stop")
        _require("stop_token_ids", self.stop_token_ids, "stop_token_ids")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            try:
                check_sampling(
                    {"max_new_tokens" if name == "max_tokens" else name: getattr(self, name)},
                    {"max_new_tokens": "max_tokens"},
                )
            except ValueError as e:
                raise InvalidRequestError(str(e), param=name) from None
        _require("stop strings", self.stop, "stop")
        _require("stop ids", self.stop_token_ids, "stop_token_ids")
        for name in ("seed", "logprobs", "best_of"):
            if getattr(self, name) is not None:
                _require(name, getattr(self, name), name)
        _require("ignore_eos", self.ignore_eos, "ignore_eos")
        _require("n", self.n, "n")
        if self.best_of is not None and self.best_of < self.n:
            raise InvalidRequestError(f"best_of must be >= n ({self.n}), got {self.best_of}", param="best_of")
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise InvalidRequestError(
                f"output_kind must be one of {[k.name for k in RequestOutputKind]}, got {self.output_kind!r}",
                param="output_kind",
            ) from None

    @property
    def num_choices(self) -> int:
        """Choices sampled: ``best_of``, or ``n``."""
        return self.best_of or self.n

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
            raise InvalidRequestError(
                f"unknown sampling field(s) {unknown}; known: {sorted(known)}", param=unknown[0]
            )
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


GREEDY_BELOW = 1e-5  # temperatures below this are greedy (as in vLLM): logits / 1e-30 overflow to inf


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _require(rule: str, value, name: str) -> None:
    try:
        _RULES[rule].require(value, name)
    except ValueError as e:
        raise InvalidRequestError(str(e), param=name) from None


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
    "n": Rule(type=int, min=1),
    "best_of": Rule(type=int, min=1),
}
