"""One request inside the engine: its tokens, where its keys and values live, and its timing.

A sequence's tokens are ``prompt_ids + output_ids``. ``num_computed`` of them have keys and values
in the KV cache (in the blocks listed by ``block_table``, ``block_size`` tokens each); the engine
feeds the rest through the model, a chunk per step. When the chunk reaches the last token, its
logits give the next token. Prefill and decode are the same operation at different chunk sizes:
a prefill computes many tokens at once, a decode step computes one.

A :class:`Request` is one prompt and its ``n`` (or ``best_of``) *choices*, each a sequence. Choice 0
computes the prompt; the moment its prompt is computed, the other choices *fork* from it: they
share its full blocks (the block manager counts references) and each samples its first token from
the same logits (:meth:`~scratchlm.serve.engine.LLMEngine.step`).
"""

from __future__ import annotations

import enum
import itertools
import time
import uuid
from dataclasses import dataclass, field

import torch

from scratchlm.serve.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted: holds no blocks
    RUNNING = "running"  # holds blocks; scheduled every step until it finishes
    FINISHED = "finished"


@dataclass
class Timing:
    """Wall-clock moments of one request (time.perf_counter), for TTFT / ITL / TPOT / E2E."""

    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)

    def summary(self, prompt_tokens: int, cached_tokens: int) -> dict:
        n = len(self.token_times)
        out = {"prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens, "output_tokens": n}
        if n:
            out["queue_s"] = (self.first_scheduled or self.arrival) - self.arrival
            out["ttft_s"] = self.token_times[0] - self.arrival
            out["e2e_s"] = self.token_times[-1] - self.arrival
            gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
            out["itl_s"] = gaps
            out["tpot_s"] = (out["e2e_s"] - out["ttft_s"]) / (n - 1) if n > 1 else None
            prefill_s = self.token_times[0] - (
                self.first_scheduled or self.arrival
            )  # from admission: no queueing
            out["prefill_tokens_per_second"] = (
                (prompt_tokens - cached_tokens) / prefill_s if prefill_s > 0 else None
            )
            out["decode_tokens_per_second"] = 1 / out["tpot_s"] if out["tpot_s"] else None
        return out


_ids = itertools.count()


class Sequence:
    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        max_output: int | None = None,
        index: int = 0,
    ):
        self.seq_id = next(_ids)
        # An id the caller did not choose is random, so it never equals one a caller did choose.
        self.request_id = request_id if request_id is not None else uuid.uuid4().hex
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.index = index  # which choice of its request
        # Output tokens at most: max_tokens, or fewer where the model's context ends first.
        self.max_output = params.max_tokens if max_output is None else max_output
        self.status = Status.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chain hashes of the full, computed blocks (prefix caching)
        self.digests: list[bytes] = []  # memo: chain hash of each full block of its tokens, once computed
        self.num_computed = 0  # tokens whose keys and values are in the cache
        self.num_cached = 0  # of the prompt, found in the prefix cache at admission (reported)
        self.num_preemptions = 0
        self.logprobs: list[dict] = []
        self.cumulative_logprob = 0.0  # of the chosen tokens (when logprobs or best_of ask for it)
        self.timing = Timing()
        # Choice i of a seeded request draws from its own stream, seeded seed + i.
        self.seed = None if params.seed is None else params.seed + index
        self.generator: torch.Generator | None = None
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)
        self.text_stream = None  # a TextStream when the engine has a tokenizer (stop strings, streaming)
        self.unforked: list[Sequence] = []  # choice 0: the other choices, until its prompt is computed
        # What the previous output of a DELTA request already carried.
        self.sent_tokens = 0
        self.unsent_text: list[str] = []
        self.finish_sent = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens ``start ... end-1`` of prompt + output (without building the whole list: a decode
        step asks for one token of a long sequence)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}, {self.status.value}, prompt {self.num_prompt}, out {len(self.output_ids)}, "
            f"computed {self.num_computed}, blocks {self.block_table})"
        )


class Request:
    """One prompt and its choices: ``params.num_choices`` sequences, choice ``i`` at ``seqs[i]``."""

    def __init__(self, request_id: str, prompt: str | None, seqs: list[Sequence]):
        self.request_id = request_id
        self.prompt = prompt  # the text, when the prompt was text
        self.seqs = seqs
        self.params = seqs[0].params
        self.error = None  # a RequestFailed, if the request could not finish

    @property
    def prompt_ids(self) -> list[int]:
        return self.seqs[0].prompt_ids

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)
