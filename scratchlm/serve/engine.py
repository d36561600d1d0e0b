"""The engine: requests in, tokens out, many requests at once.

    engine = LLMEngine.from_checkpoint("runs/shakespeare/last")
    engine.add_request("ROMEO:", SamplingParams(max_tokens=50), request_id="a")
    while engine.has_unfinished():
        for out in engine.step():          # one forward pass for every running request
            print(out.request_id, out.delta_text)

Each :meth:`LLMEngine.step` asks the :class:`~scratchlm.serve.scheduler.Scheduler` what to run,
has the :class:`~scratchlm.serve.runner.ModelRunner` compute it, appends the sampled tokens, checks
each request's stop conditions, and frees finished requests' blocks. :class:`LLM` is the offline
batch interface on top (``LLM(ckpt).generate(prompts, params)``); the async streaming interface for
servers is :class:`~scratchlm.serve.async_engine.AsyncLLMEngine`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scratchlm.config import Rule
from scratchlm.generate.generate import TextStream
from scratchlm.generate.tokenizer import checkpoint_tokenizer
from scratchlm.serve.block_manager import BlockManager
from scratchlm.serve.params import SamplingParams
from scratchlm.serve.runner import ModelRunner
from scratchlm.serve.scheduler import Scheduler
from scratchlm.serve.sequence import Sequence, Status
from scratchlm.tokenizers.base import check_model_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RequestOutput:
    """A request's state after a step: everything so far, and what this step added (``delta_*``)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    logprobs: list[dict] | None = None
    metrics: dict | None = None  # when finished: TTFT, ITL, TPOT, E2E, cached and preempted counts
    error: str | None = None  # why, when finish_reason is "error" (this request only; the engine goes on)


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: enough for max_num_seqs full contexts, within kv_cache_gb
    kv_cache_gb: float = 2.0  # memory cap for the KV pool when num_blocks is None
    max_num_seqs: int = 64  # running sequences at most
    max_num_batched_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    enable_prefix_caching: bool = True
    weight_format: str = "auto"  # auto | dense | onednn (scratchlm.serve.weights)
    check_invariants: bool = False  # tests: check the block manager after every step

    def __post_init__(self):
        for name, rule in _CONFIG_RULES.items():
            if not (name == "num_blocks" and self.num_blocks is None):
                rule.require(getattr(self, name), name)


_CONFIG_RULES = {
    "block_size": Rule(type=int, min=1, why="tokens per KV block"),
    "num_blocks": Rule(type=int, min=1, why="or None: from kv_cache_gb"),
    "kv_cache_gb": Rule(type=float, above=0),
    "max_num_seqs": Rule(type=int, min=1),
    "max_num_batched_tokens": Rule(type=int, min=1),
}


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig(**overrides)
        c = model.config
        p = next(model.parameters())
        per_block = 2 * c.n_layer * config.block_size * c.kv_heads * c.head_dim * p.element_size()
        num_blocks = config.num_blocks
        if num_blocks is None:
            running = min(config.max_num_seqs, config.max_num_batched_tokens)  # the scheduler's cap
            wanted = running * math.ceil(c.block_size / config.block_size)
            num_blocks = max(1, min(wanted, int(config.kv_cache_gb * 2**30 // per_block)))
        if tokenizer is not None:
            check_model_tokenizer(
                tokenizer,
                rows=c.vocab_size,
                fingerprint=None,
                model="the model",
                source="the tokenizer",
                fix="give the engine the model's own",
            )
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.context = c.block_size
        # Ids a request may contain and the sampler may choose: the tokenizer's (a model's embedding
        # table may be padded past it, as GPT-2's 50257 to 50304, and those rows mean nothing).
        self.vocab_size = tokenizer.vocab_size if tokenizer is not None else c.vocab_size
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.weight_format, self.vocab_size)
        self.requests: dict[str, Sequence] = {}
        # End of sequence: <|endoftext|>, and for a chat model the end of a turn, <|im_end|> (what its
        # exported generation_config says too).
        specials = tokenizer.special_tokens if tokenizer is not None else {}
        self.eos_ids = {
            i for i in (specials.get("<|endoftext|>"), specials.get("<|im_end|>")) if i is not None
        }
        self.num_steps = 0
        self.num_generated = 0

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        tokenizer=None,
        device: str | None = None,
        dtype: str = "float32",
        **engine_options,
    ) -> LLMEngine:
        """Load a checkpoint folder (trained or imported) for inference; ``tokenizer``: a tokenizer
        object, a JSON path or ``"gpt2"`` (default: the one the checkpoint was trained with)."""
        from scratchlm.device import pick_device
        from scratchlm.models.checkpoint import load_model_from_checkpoint

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        config = EngineConfig(**engine_options)  # bad options are refused before the weights load
        model, state = load_model_from_checkpoint(path, pick_device(device))
        tokenizer = checkpoint_tokenizer(path, state, tokenizer)
        return cls(model.to(DTYPES[dtype]), tokenizer, config)

    # --- requests ---------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue one request; return its id. A bad request raises ``ValueError`` and changes nothing.

        As in vLLM, the model's context bounds prompt and output together: a prompt that fills the
        context is refused, and otherwise generation stops at the context with finish_reason
        ``"length"`` (``max_tokens`` is a cap, not a promise)."""
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt)
        if len(ids) >= self.context:
            raise ValueError(
                f"the prompt is {len(ids)} tokens; this model's context is {self.context} tokens (prompt and "
                f"output together): shorten the prompt to at most {self.context - 1} tokens"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: give the engine one, or use stop_token_ids")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(
                f"stop_token_ids {bad[:5]} are not in the vocabulary (0 ... {self.vocab_size - 1})"
            )
        if request_id is not None and request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(ids, params, request_id, max_output=min(params.max_tokens, self.context - len(ids)))
        if self.tokenizer is not None:
            seq.text_stream = TextStream(self.tokenizer, params.stop)
        self.scheduler.add(seq)  # raises if it could never fit in the cache
        self.requests[seq.request_id] = seq
        return seq.request_id

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: give the engine one, or pass token ids")
            ids = self.tokenizer.encode(prompt, allowed_special="all")
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("a prompt is a string or a list of integer token ids")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt token ids {bad[:5]} are outside the vocabulary (0 ... {self.vocab_size - 1})"
                )
        else:
            raise ValueError(
                f"a prompt is a string or a list of integer token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        return ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is (waiting or running) and free its blocks."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq, [], "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, compute and sample once; return the outputs of the requests that got a token."""
        step = self.scheduler.schedule()
        if not step.chunks:
            return []
        return self._run(step)

    def _run(self, step) -> list[RequestOutput]:
        if self.config.check_invariants:
            self.blocks.check_writable(step.chunks)
        self.runner.scrub(self.blocks.take_fresh())  # no stale garbage in newly allocated blocks
        sampled, tokens, logprobs, errors = self.runner.step(step.chunks)
        self.num_steps += 1
        for seq, n in step.chunks:
            seq.num_computed += n
            self.blocks.register(seq)  # its newly full blocks join the prefix cache
        outputs = []
        now = time.perf_counter()
        for seq, token, logprob, error in zip(sampled, tokens, logprobs, errors):
            if error is not None:  # NaN or inf logits: this request fails, the others go on
                outputs.append(self._fail(seq, error))
                continue
            seq.output_ids.append(token)
            seq.timing.token_times.append(now)
            self.num_generated += 1
            if logprob is not None:
                seq.logprobs.append(logprob)
            try:
                reason, delta = self._check_stop(seq, token)
            except Exception as e:  # e.g. a tokenizer that cannot decode the token: this request only
                seq.output_ids.pop()  # token_ids stay the concatenation of the delta_token_ids streamed
                outputs.append(self._fail(seq, f"could not decode token {token}: {e!r}"))
                continue
            if reason:
                self._finish(seq, reason)
            outputs.append(self._output(seq, [token], delta))
        if self.config.check_invariants:
            self.blocks.check(self.scheduler.running)
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        del self.requests[seq.request_id]

    def _fail(self, seq: Sequence, error: str) -> RequestOutput:
        self._finish(seq, "error")
        out = self._output(seq, [], "")
        out.error = error
        return out

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, str]:
        params, stream = seq.params, seq.text_stream
        reason = None
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"  # the stop token is in token_ids, not in the text
        delta = ""
        if stream is not None and reason is None:
            delta = stream.push(token)
            if stream.stopped:
                reason = "stop"
        if reason is None and len(seq.output_ids) >= seq.max_output:
            reason = "length"  # max_tokens, or the end of the model's context
        if reason and stream is not None:
            delta += stream.finish()
        return reason, delta

    def _output(self, seq: Sequence, new_ids: list[int], delta: str) -> RequestOutput:
        finished = seq.status is Status.FINISHED
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            text=seq.text_stream.text if seq.text_stream is not None else None,
            finished=finished,
            finish_reason=seq.finish_reason,
            delta_token_ids=new_ids,
            delta_text=delta,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            metrics={**seq.timing.summary(seq.num_prompt, seq.num_cached), "preemptions": seq.num_preemptions}
            if finished
            else None,
        )

    def stats(self) -> dict:
        b = self.blocks
        return {
            "steps": self.num_steps,
            "generated_tokens": self.num_generated,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_rate": b.hit_rate,
            "prefix_cache_hit_tokens": b.hit_tokens,
            "prefix_cache_query_tokens": b.query_tokens,
            "weight_format": self.runner.weight_format,
            "num_blocks": b.num_blocks,
            "free_blocks": b.num_free,
            "block_size": b.block_size,
            "kv_cache_bytes": self.runner.pool.bytes,
            "max_num_seqs": self.scheduler.max_num_seqs,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }


class LLM:
    """Offline batches: ``LLM(checkpoint).generate(prompts, SamplingParams(...))`` -> outputs in order."""

    def __init__(
        self,
        model_or_checkpoint,
        tokenizer=None,
        *,
        device: str | None = None,
        dtype: str = "float32",
        **engine_options,
    ):
        if isinstance(model_or_checkpoint, (str, Path)):
            self.engine = LLMEngine.from_checkpoint(
                model_or_checkpoint, tokenizer=tokenizer, device=device, dtype=dtype, **engine_options
            )
        else:
            self.engine = LLMEngine(model_or_checkpoint, tokenizer, **engine_options)

    def generate(
        self,
        prompts: list[str | list[int]] | str,
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        engine = self.engine
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        bar = None
        try:  # whatever happens (a bad prompt, Ctrl-C, an exception), no request stays in the engine
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                try:
                    ids.append(engine.add_request(prompt, p))
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(ids), desc="generating", unit="req")
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for request_id in ids:
                if request_id not in results:
                    engine.abort(request_id)
        return [results[i] for i in ids]
