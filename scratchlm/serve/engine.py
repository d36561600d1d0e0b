"""The engine: requests in, tokens out, many requests at once.

    engine = LLMEngine.from_checkpoint("runs/shakespeare/last")
    engine.add_request("ROMEO:", SamplingParams(max_tokens=50, output_kind=RequestOutputKind.DELTA))
    while engine.has_unfinished():
        for out in engine.step():          # one forward pass for every running request
            print(out.request_id, out.outputs[0].text)

Each :meth:`LLMEngine.step` asks the :class:`~scratchlm.serve.scheduler.Scheduler` what to run,
has the :class:`~scratchlm.serve.runner.ModelRunner` compute it, samples the next tokens (a
request with ``n > 1`` forks its choices the moment its prompt is computed), checks each choice's
stop conditions, frees finished sequences' blocks, and reports each changed request as a
:class:`RequestOutput` (vLLM's shape: ``outputs[i].text / token_ids / finish_reason``).
:meth:`LLMEngine.add_request` is :meth:`~LLMEngine.make_request` (check and tokenize: any thread)
then :meth:`~LLMEngine.enqueue` (the engine's thread). :class:`LLM` is the offline batch interface on
top (``LLM(ckpt).generate(prompts, params)``); the async streaming interface for servers is
:class:`~scratchlm.serve.async_engine.AsyncLLMEngine`.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from scratchlm.config import Rule
from scratchlm.generate.generate import TextStream, start_ids
from scratchlm.generate.tokenizer import checkpoint_tokenizer
from scratchlm.serve.block_manager import BlockManager
from scratchlm.serve.errors import EngineOverloaded, InvalidRequestError, RequestFailed
from scratchlm.serve.params import RequestOutputKind, SamplingParams
from scratchlm.serve.runner import ModelRunner
from scratchlm.serve.sampler import sample
from scratchlm.serve.scheduler import Scheduler
from scratchlm.serve.sequence import Request, Sequence
from scratchlm.tokenizers.base import check_model_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CompletionOutput:
    """One choice of a request, as vLLM's: its tokens and text (all so far, or only the new ones
    for a ``DELTA`` request), and once it ends why: ``finish_reason`` is ``"stop"`` (an end-of-text
    token, a stop token or a stop string: ``stop_reason`` says which token id or string, ``None``
    for end-of-text), ``"length"`` (``max_tokens`` or the end of the context) or ``"abort"``."""

    index: int
    text: str | None  # None when the engine has no tokenizer
    token_ids: list[int]
    cumulative_logprob: float | None  # when logprobs were asked for
    logprobs: list[dict] | None  # per token: {"token", "logprob", "top": [(id, logprob), ...]}
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request after a step: its prompt and its choices (``outputs[i].index == i``, in DELTA mode
    only those with something new). A request that could not finish has ``error`` set (a
    :class:`~scratchlm.serve.errors.RequestFailed`, which every frontend raises) and no outputs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: dict | None = None  # when finished: TTFT, ITL, TPOT, E2E, cached and preempted counts
    error: RequestFailed | None = None

    def add(self, later: RequestOutput, aggregate: bool) -> None:
        """Fold ``later`` (the same request's next output) into this one, so a stream whose consumer
        is behind holds one output, not one per step. ``aggregate`` (DELTA outputs): append each
        choice's new tokens, text and logprobs; otherwise ``later`` already holds everything."""
        if not aggregate:
            self.outputs = later.outputs
        else:
            mine = {c.index: c for c in self.outputs}
            for c in later.outputs:
                old = mine.get(c.index)
                if old is None:
                    self.outputs.append(c)
                    continue
                old.token_ids.extend(c.token_ids)
                if old.text is not None:
                    old.text += c.text
                if old.logprobs is not None:
                    old.logprobs.extend(c.logprobs)
                old.cumulative_logprob, old.finish_reason, old.stop_reason = (
                    c.cumulative_logprob,
                    c.finish_reason,
                    c.stop_reason,
                )
            self.outputs.sort(key=lambda c: c.index)
        self.finished, self.metrics, self.error = later.finished, later.metrics, later.error


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: enough for max_num_seqs full contexts, within kv_cache_gb
    kv_cache_gb: float = 2.0  # memory cap for the KV pool when num_blocks is None
    max_num_seqs: int = 64  # running sequences at most
    max_num_batched_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    max_waiting: int | None = None  # requests waiting for admission at most (None: no limit)
    enable_prefix_caching: bool = True
    weight_format: str = "auto"  # auto | dense | onednn (scratchlm.serve.weights)
    check_invariants: bool = False  # tests: check the block manager after every step

    def __post_init__(self):
        for name, rule in _CONFIG_RULES.items():
            if not (name in ("num_blocks", "max_waiting") and getattr(self, name) is None):
                rule.require(getattr(self, name), name)


_CONFIG_RULES = {
    "block_size": Rule(type=int, min=1, why="tokens per KV block"),
    "num_blocks": Rule(type=int, min=1, why="or None: from kv_cache_gb"),
    "kv_cache_gb": Rule(type=float, above=0),
    "max_num_seqs": Rule(type=int, min=1),
    "max_num_batched_tokens": Rule(type=int, min=1),
    "max_waiting": Rule(type=int, min=1, why="or None: no limit"),
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
        """Check, tokenize and queue one request; return its id (:meth:`make_request`, then
        :meth:`enqueue`). A bad request raises ``InvalidRequestError`` (a ``ValueError``), a full
        waiting queue ``EngineOverloaded``; either way nothing changes."""
        return self.enqueue(self.make_request(prompt, params, request_id))

    def make_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """A checked, tokenized request, not yet queued. It reads only the engine's fixed settings,
        so a frontend calls it in its own thread: a long prompt's tokenization never stalls a step.

        As in vLLM, the model's context bounds prompt and output together: a prompt that fills the
        context is refused, and otherwise generation stops at the context with finish_reason
        ``"length"`` (``max_tokens`` is a cap, not a promise)."""
        params = params or SamplingParams()
        text, ids = self._prompt_ids(prompt)
        if len(ids) >= self.context:
            raise InvalidRequestError(
                f"the prompt is {len(ids)} tokens; this model's context is {self.context} tokens (prompt and "
                f"output together): shorten the prompt to at most {self.context - 1} tokens",
                param="prompt",
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer: give the engine one, or use stop_token_ids", param="stop"
            )
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids {bad[:5]} are not in the vocabulary (0 ... {self.vocab_size - 1})",
                param="stop_token_ids",
            )
        if params.num_choices > self.scheduler.max_num_seqs:
            name = "n" if params.best_of is None else "best_of"
            raise InvalidRequestError(
                f"{name} is {params.num_choices}, but this engine runs at most {self.scheduler.max_num_seqs} "
                "sequences at once (max_num_seqs)",
                param=name,
            )
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        max_output = min(params.max_tokens, self.context - len(ids))
        seqs = [Sequence(ids, params, request_id, max_output, index=i) for i in range(params.num_choices)]
        for seq in seqs:
            seq.prompt_ids = seqs[0].prompt_ids  # one list for all choices
            if self.tokenizer is not None:
                seq.text_stream = TextStream(self.tokenizer, params.stop)
        try:
            self.scheduler.check_fits(seqs[0])
        except ValueError as e:
            raise InvalidRequestError(str(e), param="max_tokens") from None
        seqs[0].unforked = seqs[1:]  # they fork from choice 0 once it has computed the prompt
        return Request(request_id, text, seqs)

    def enqueue(self, request: Request) -> str:
        """Queue a request made by :meth:`make_request` (on the engine's own thread, between steps)."""
        if request.request_id in self.requests:
            raise InvalidRequestError(
                f"request id {request.request_id!r} is already in use", param="request_id"
            )
        limit = self.config.max_waiting
        if limit is not None and len(self.scheduler.waiting) >= limit:
            raise EngineOverloaded(f"{limit} requests are already waiting (max_waiting): try again shortly")
        self.scheduler.add(request.seqs[0])
        self.requests[request.request_id] = request
        return request.request_id

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(the prompt's text or None, its token ids)."""
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "a text prompt needs a tokenizer: give the engine one, or pass token ids", param="prompt"
                )
            text, ids = prompt, self.tokenizer.encode(prompt, allowed_special="all")
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequestError(
                    "a prompt is a string or a list of integer token ids", param="prompt"
                )
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt token ids {bad[:5]} are outside the vocabulary (0 ... {self.vocab_size - 1})",
                    param="prompt",
                )
        else:
            raise InvalidRequestError(
                f"a prompt is a string or a list of integer token ids, got {type(prompt).__name__}",
                param="prompt",
            )
        if not ids:  # a prompt of nothing starts where text starts, as `scratchlm sample` does
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "the prompt is empty, and an engine without a tokenizer cannot tell where text starts: "
                    "give at least one token",
                    param="prompt",
                )
            try:
                ids = start_ids(self.tokenizer)
            except ValueError as e:
                raise InvalidRequestError(str(e), param="prompt") from None
        return text, ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is (waiting or running) and free its blocks; its last output
        (``finish_reason == "abort"`` for the choices still going)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return self._output(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, compute and sample once; return the outputs of the requests that changed."""
        step = self.scheduler.schedule()
        if not step.chunks:
            return []
        return self._run(step)

    def _run(self, step) -> list[RequestOutput]:
        if self.config.check_invariants:
            self.blocks.check_writable(step.chunks)
        self.runner.scrub(self.blocks.take_fresh())  # no stale garbage in newly allocated blocks
        ready, logits = self.runner.forward(step.chunks)
        self.num_steps += 1
        for seq, n in step.chunks:
            seq.num_computed += n
            self.blocks.register(seq)  # its newly full blocks join the prefix cache
        # A prompt just computed: the request's other choices fork from it (sharing its full blocks)
        # and draw their first tokens from the same logits row, each with its own generator.
        rows, seqs = [], []
        for row, seq in enumerate(ready):
            for choice in [seq, *seq.unforked]:
                if choice is not seq:
                    self.scheduler.fork(seq, choice)
                rows.append(row)
                seqs.append(choice)
            seq.unforked = []
        if len(seqs) > len(ready):
            logits = logits[torch.tensor(rows, device=logits.device)]
        tokens, records, errors = sample(logits, seqs) if seqs else ([], [], [])
        changed: dict[str, Request] = {}
        now = time.perf_counter()
        for seq, token, record, error in zip(seqs, tokens, records, errors):
            request = self.requests.get(seq.request_id)
            if request is None or request.error is not None:  # another choice failed in this step
                continue
            changed[request.request_id] = request
            if error is not None:  # NaN or inf logits: this request fails, the others go on
                self._fail(request, error)
                continue
            seq.output_ids.append(token)
            seq.timing.token_times.append(now)
            self.num_generated += 1
            if record is not None:
                seq.cumulative_logprob += record["logprob"]
                if seq.params.logprobs is not None:
                    seq.logprobs.append(record)
            try:
                reason = self._check_stop(seq, token)
            except Exception as e:  # e.g. a tokenizer that cannot decode the token: this request only
                seq.output_ids.pop()
                self._fail(request, f"could not decode token {token}: {e!r}")
                continue
            if reason:
                self.scheduler.finish(seq, reason)
        outputs = []
        for request in changed.values():
            out = self._output(request)
            if request.finished:
                del self.requests[request.request_id]
            if out is not None:
                outputs.append(out)
        if self.config.check_invariants:
            self.blocks.check(self.scheduler.running)
        return outputs

    def _fail(self, request: Request, error: str) -> None:
        request.error = RequestFailed(error, request.request_id)
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, None)

    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        """Why ``seq`` ends with ``token`` ("stop", "length") or None; its new text is kept for a
        DELTA output."""
        params, stream = seq.params, seq.text_stream
        reason = None
        if token in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token  # the stop token is in token_ids, not in the text
        elif token in self.eos_ids and not params.ignore_eos:
            reason = "stop"  # end of text: stop_reason None, as in vLLM
        delta = ""
        if stream is not None and reason is None:
            delta = stream.push(token)
            if stream.stopped:
                reason, seq.stop_reason = "stop", self._stop_string(seq)
        if reason is None and len(seq.output_ids) >= seq.max_output:
            reason = "length"  # max_tokens, or the end of the model's context
        if reason and stream is not None:
            delta += stream.finish()
        if delta and params.output_kind is RequestOutputKind.DELTA:
            seq.unsent_text.append(delta)
        return reason

    def _stop_string(self, seq: Sequence) -> str | None:
        """Which stop string ended ``seq``: the one that follows its text in the decoded tokens."""
        decoded = self.tokenizer.decode_bytes(seq.output_ids).decode("utf-8", errors="replace")
        cut = len(seq.text_stream.text)
        return next((s for s in seq.params.stop if decoded.startswith(s, cut)), None)

    def _output(self, request: Request) -> RequestOutput | None:
        """The request's output now, by its ``output_kind``; None when it has nothing to say yet."""
        params, finished = request.params, request.finished
        if request.error is not None:
            return RequestOutput(
                request.request_id, request.prompt, request.prompt_ids, [], True, error=request.error
            )
        best_of = params.num_choices > params.n  # which choices to keep is known only at the end
        if not finished and (best_of or params.output_kind is RequestOutputKind.FINAL_ONLY):
            return None
        seqs = request.seqs
        if best_of:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: params.n]
        delta = params.output_kind is RequestOutputKind.DELTA
        choices = [
            self._choice(seq, index, delta)
            for index, seq in enumerate(seqs)
            if not delta
            or seq.sent_tokens < len(seq.output_ids)
            or seq.unsent_text
            or seq.is_finished
            and not seq.finish_sent
        ]
        metrics = None
        if finished:
            first = request.seqs[0]
            metrics = {
                **first.timing.summary(first.num_prompt, first.num_cached),
                "output_tokens": sum(len(s.output_ids) for s in request.seqs),
                "preemptions": sum(s.num_preemptions for s in request.seqs),
            }
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_ids, choices, finished, metrics
        )

    def _choice(self, seq: Sequence, index: int, delta: bool) -> CompletionOutput:
        """Choice ``seq`` as output ``index``: everything so far, or (``delta``) what is new since
        its previous output."""
        wants = seq.params.logprobs is not None
        start = seq.sent_tokens if delta else 0
        if delta:
            text = "".join(seq.unsent_text) if seq.text_stream is not None else None
            seq.sent_tokens, seq.unsent_text, seq.finish_sent = len(seq.output_ids), [], seq.is_finished
        else:
            text = seq.text_stream.text if seq.text_stream is not None else None
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=seq.output_ids[start:],
            cumulative_logprob=seq.cumulative_logprob
            if wants or seq.params.num_choices > seq.params.n
            else None,
            logprobs=seq.logprobs[start:] if wants else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
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
        """Every prompt's finished output, in order. A bad prompt raises ``InvalidRequestError``
        before anything runs; a request that fails while running raises ``RequestFailed``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        # One output per request, when it finishes (as vLLM's LLM): no copies of unfinished ones.
        params = [replace(p or SamplingParams(), output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        engine = self.engine
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        bar = None
        try:  # whatever happens (a bad prompt, Ctrl-C, an exception), no request stays in the engine
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                try:
                    ids.append(engine.add_request(prompt, p))
                except InvalidRequestError as e:
                    raise InvalidRequestError(f"prompt {i}: {e}", param=e.param) from None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(ids), desc="generating", unit="req")
            while len(results) < len(ids):
                for out in engine.step():
                    if out.error is not None:  # the other requests are aborted below
                        raise RequestFailed(
                            f"prompt {ids.index(out.request_id)}: {out.error}", out.request_id
                        )
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
