"""The engine's API as a server drives it: output kinds and bounded streams, tokenizing in the
frontend, admission control and error types, health, ``n`` / ``best_of`` forks, and the vLLM-shaped
request output. Real models (random weights, a real character tokenizer) throughout."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
import torch

from scratchlm.generate import generate
from scratchlm.generate.sampling import SamplingConfig
from scratchlm.models.blocks.moe import MoEConfig
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.serve import (
    LLM,
    EngineOverloaded,
    EngineUnhealthy,
    InvalidRequestError,
    LLMEngine,
    RequestFailed,
    RequestOutput,
    RequestOutputKind,
    SamplingParams,
)
from scratchlm.serve.async_engine import AsyncLLMEngine

FINISH_REASONS = {"stop", "length", "abort"}


def tiny(vocab=97, block=96, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=block, init_std=0.3, **kw
    )
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def char(shakespeare_text):
    """A character tokenizer of real text and a random model of its vocabulary, 512 tokens of context."""
    from scratchlm.tokenizers import CharTokenizer

    tok = CharTokenizer.train(shakespeare_text, ["<|endoftext|>"])
    return tiny(vocab=tok.vocab_size, block=512, seed=3), tok


def drained(engine: LLMEngine) -> None:
    assert not engine.has_unfinished() and not engine.requests
    assert engine.blocks.num_free == engine.blocks.num_blocks
    engine.blocks.check([])


def live_outputs() -> int:
    gc.collect()
    return sum(type(o) is RequestOutput for o in gc.get_objects())


# --- 1. output kinds; a stalled consumer's stream stays one output -----------------------------------
def test_a_stalled_consumer_holds_one_output_and_deltas_join_to_the_cumulative_output(char):
    """A client that stops reading while its 300-token request runs costs one queued output, not
    300: newer outputs are folded into the waiting one. The DELTA outputs, joined, equal the
    cumulative output exactly (token ids, text, logprobs), stalled or not."""
    model, tok = char
    settings = dict(max_tokens=300, temperature=1.0, seed=11, logprobs=2, ignore_eos=True)
    reference = LLM(model, tok).generate(["ROMEO:"], SamplingParams(**settings))[0].outputs[0]
    assert len(reference.token_ids) == 300
    engine = AsyncLLMEngine(LLMEngine(model, tok, check_invariants=True))

    async def consume(kind, stall):
        outs = []
        params = SamplingParams(**settings, output_kind=kind)
        async for out in engine.generate("ROMEO:", params):
            outs.append(out)
            if stall and len(outs) == 1:
                baseline = live_outputs()
                while engine.engine.requests:  # the engine finishes the request; nobody reads
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)  # every output sent has reached the stream
                # the waiting output (and the engine thread's last, until its next step): not ~300
                assert live_outputs() <= baseline + 2
        return outs

    async def main():
        for stall in (True, False):
            cumulative = await consume(RequestOutputKind.CUMULATIVE, stall)
            last = cumulative[-1].outputs[0]
            assert (last.token_ids, last.text, last.logprobs) == (
                reference.token_ids,
                reference.text,
                reference.logprobs,
            )
            if stall:
                assert len(cumulative) == 2  # the first output, then everything else folded into one
            deltas = await consume(RequestOutputKind.DELTA, stall)
            assert all(len(o.outputs) == 1 and o.outputs[0].index == 0 for o in deltas)
            joined = [t for o in deltas for t in o.outputs[0].token_ids]
            assert joined == reference.token_ids
            assert "".join(o.outputs[0].text for o in deltas) == reference.text
            assert [r for o in deltas for r in o.outputs[0].logprobs] == reference.logprobs
            assert deltas[-1].outputs[0].cumulative_logprob == pytest.approx(
                sum(r["logprob"] for r in reference.logprobs)
            )
            assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"
            final = await consume(RequestOutputKind.FINAL_ONLY, stall=False)
            assert len(final) == 1 and final[0].outputs[0].token_ids == reference.token_ids
        engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), 120))


# --- 2. tokenizing happens in the frontend --------------------------------------------------------
def test_prompts_are_tokenized_off_the_engine_thread(char):
    """The async frontend checks and tokenizes a prompt before the engine thread sees it: a very
    long prompt's encoding never runs on the engine thread (where it would stall every decode)."""
    model, tok = char
    threads = []
    encode = tok.encode

    def recording_encode(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    tok.encode = recording_encode
    try:
        engine = AsyncLLMEngine(LLMEngine(model, tok))

        async def main():
            running = engine.generate("ROMEO:", SamplingParams(max_tokens=40, temperature=0))
            first = await running.__anext__()  # the engine thread is up and decoding
            with pytest.raises(InvalidRequestError, match="the prompt is 200000 tokens") as refused:
                async for _ in engine.generate("x" * 200_000, SamplingParams(max_tokens=4)):
                    pass
            assert refused.value.param == "prompt"
            long = "JULIET: " * 60  # 480 tokens
            outs = [o async for o in engine.generate(long, SamplingParams(max_tokens=8, temperature=0))]
            rest = [o async for o in running]
            engine.shutdown()
            return first, outs, rest

        first, outs, rest = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        del tok.encode
    assert len(threads) == 3 and "scratchlm-engine" not in threads, threads
    assert outs[-1].prompt == "JULIET: " * 60 and len(outs[-1].prompt_token_ids) == 480
    assert rest[-1].outputs[0].finish_reason == "length"


# --- 3. admission control ---------------------------------------------------------------------------
def test_bad_requests_and_a_full_waiting_queue_raise_distinct_errors():
    model = tiny()
    engine = LLMEngine(model, block_size=4, max_num_seqs=2, max_waiting=2)
    for params, prompt, param in [
        (dict(temperature=-1), [1, 2], "temperature"),
        (dict(top_p=0), [1, 2], "top_p"),
        (dict(n=2, best_of=1), [1, 2], "best_of"),
        (dict(n=3), [1, 2], "n"),  # more choices than max_num_seqs: could never run
        (dict(), list(range(96)), "prompt"),  # fills the context
        (dict(), [1, 200], "prompt"),  # outside the vocabulary
        (dict(stop_token_ids=[500]), [1], "stop_token_ids"),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request(prompt, SamplingParams(**params))
        assert isinstance(e.value, ValueError) and e.value.param == param, (params, e.value.param)
    engine.add_request([1, 2], request_id="a")
    with pytest.raises(InvalidRequestError, match="already in use") as e:
        engine.add_request([3], request_id="a")
    assert e.value.param == "request_id"
    engine.add_request([1, 2, 3])
    with pytest.raises(EngineOverloaded, match="2 requests are already waiting") as e:
        engine.add_request([4, 5])
    assert not isinstance(e.value, ValueError) and e.value.retry_after > 0
    assert len(engine.requests) == 2  # the refused ones changed nothing
    while engine.has_unfinished():  # admitted, the queue empties, and new requests are accepted
        engine.step()
    engine.add_request([4, 5])
    while engine.has_unfinished():
        engine.step()
    drained(engine)


def test_the_async_engine_refuses_over_capacity_and_goes_on():
    model = tiny()
    llm = LLMEngine(model, block_size=4, max_num_seqs=1, max_waiting=1)
    engine = AsyncLLMEngine(llm)

    async def main():
        params = SamplingParams(max_tokens=60, temperature=0)
        running = engine.generate([1, 2, 3], params)
        await running.__anext__()  # running: the one slot is taken
        queued = asyncio.ensure_future(_last(engine.generate([4, 5, 6], params)))
        while not llm.scheduler.waiting:
            await asyncio.sleep(0.005)
        with pytest.raises(EngineOverloaded):
            await _last(engine.generate([7, 8], params))
        with pytest.raises(ValueError, match="max_tokens"):
            await _last(engine.generate([7, 8], SamplingParams(max_tokens=0)))
        assert (await _last(running)).outputs[0].finish_reason == "length"
        done = await queued
        assert done.outputs[0].token_ids == generate(model, [4, 5, 6], 60, SamplingConfig(temperature=0))[0]
        engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))
    drained(llm)


async def _last(stream):
    out = None
    async for out in stream:  # noqa: B007
        pass
    return out


# --- 4. health ------------------------------------------------------------------------------------
def test_steps_that_keep_failing_make_the_engine_unhealthy_and_one_good_step_heals_it():
    """A real failure: the output matrix loses a column (as a torn write of the weights would
    leave it), so every forward pass raises a shape error in torch. The engine thread stays alive
    (a thread-alive check would pass) while every request fails; after 3 failed steps in a row
    ``check_health`` raises, and once the weights are whole again one good step makes it healthy."""
    model = tiny(tie_embeddings=False)
    llm = LLMEngine(model, block_size=4, weight_format="dense")
    engine = AsyncLLMEngine(llm, unhealthy_after=3)
    whole = model.lm_head.weight.data

    async def main():
        p = SamplingParams(max_tokens=5, temperature=0)
        assert (await _last(engine.generate([1, 2, 3], p))).finished
        model.lm_head.weight.data = whole[:, :-1]
        for _ in range(3):
            assert engine.healthy
            with pytest.raises(RequestFailed, match="the engine step failed"):
                await _last(engine.generate([1, 2, 3], p))
        assert not engine.healthy and engine._thread.is_alive()
        with pytest.raises(EngineUnhealthy, match="last 3 engine steps failed.*RuntimeError"):
            engine.check_health()
        model.lm_head.weight.data = whole
        out = await _last(engine.generate([1, 2, 3], p))
        assert out.outputs[0].token_ids == generate(model, [1, 2, 3], 5, SamplingConfig(temperature=0))[0]
        engine.check_health()
        engine.shutdown()
        with pytest.raises(EngineUnhealthy, match="shut down"):
            engine.check_health()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_an_moe_model_runs_under_the_default_weight_format():
    """An MoE router reads its matrix itself (``F.linear(x, router.weight)``): with oneDNN-packed
    linears (the CPU default) every step used to fail with an AttributeError."""
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=97,
            block_size=64,
            n_layer=2,
            n_head=4,
            d_model=64,
            layers=["attention+moe"],
            moe=MoEConfig(n_experts=4, top_k=2),
        )
    ).eval()
    p = [1, 2, 3, 4, 5]
    expected = generate(model, p, 6, SamplingConfig(temperature=0))[0]
    for fmt in ("auto", "dense"):
        out = LLM(model, weight_format=fmt).generate([p], SamplingParams(max_tokens=6, temperature=0))[0]
        assert out.outputs[0].token_ids == expected, fmt


# --- 5. n and best_of -------------------------------------------------------------------------------
def _run(engine: LLMEngine, requests) -> tuple[dict[str, RequestOutput], int]:
    """Run ``(prompt, params)`` requests added together; their final outputs and the most blocks in use."""
    ids = [engine.add_request(p, params) for p, params in requests]
    outs, peak = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        peak = max(peak, engine.blocks.num_blocks - engine.blocks.num_free)
    drained(engine)
    return [outs[i] for i in ids], peak


@pytest.mark.parametrize("caching", [True, False])
def test_n_choices_fork_from_one_prompt_and_share_its_blocks(caching):
    """``n=3`` with a seed: three distinct choices, ``index`` 0..2, choice ``i`` equal to a request
    with ``n=1`` and seed ``seed + i``; the prompt's full blocks are computed and held once."""
    model = tiny()
    prompt = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(4)).tolist()  # 7.5 blocks
    settings = dict(max_tokens=12, temperature=1.0, logprobs=0)

    def engine():
        return LLMEngine(model, block_size=4, enable_prefix_caching=caching, check_invariants=True)

    [forked], forked_peak = _run(engine(), [(prompt, SamplingParams(**settings, n=3, seed=5))])
    alone, alone_peak = _run(engine(), [(prompt, SamplingParams(**settings, seed=5 + i)) for i in range(3)])
    assert [c.index for c in forked.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in forked.outputs}) == 3
    for choice, single in zip(forked.outputs, alone):
        assert choice.token_ids == single.outputs[0].token_ids
        assert choice.cumulative_logprob == pytest.approx(single.outputs[0].cumulative_logprob, abs=1e-4)
        assert choice.finish_reason == "length"
    assert forked.prompt_token_ids == prompt and forked.metrics["output_tokens"] == 36
    # the 7 full blocks of the prompt are held once, not three times
    assert forked_peak <= alone_peak - 2 * 7


def test_n_choices_stream_as_deltas_per_index():
    model = tiny()
    engine = LLMEngine(model, block_size=4, check_invariants=True)
    p = [5, 6, 7, 8, 9]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1, n=3, output_kind=RequestOutputKind.DELTA)
    engine.add_request(p, params, "r")
    joined = {0: [], 1: [], 2: []}
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                assert c.index not in finished, "nothing after a choice's finish"
                joined[c.index] += c.token_ids
                if c.finish_reason:
                    finished[c.index] = c.finish_reason
    [cumulative], _ = _run(engine, [(p, SamplingParams(max_tokens=10, temperature=1.0, seed=1, n=3))])
    assert [joined[i] for i in range(3)] == [c.token_ids for c in cumulative.outputs]
    assert finished == {0: "length", 1: "length", 2: "length"}


def test_best_of_keeps_the_n_choices_with_the_highest_cumulative_logprob():
    model = tiny()
    p = [3, 1, 4, 1, 5, 9, 2, 6]
    settings = dict(max_tokens=8, temperature=1.5, seed=21)
    [all4], _ = _run(LLMEngine(model, block_size=4), [(p, SamplingParams(**settings, n=4, logprobs=0))])
    [best], _ = _run(LLMEngine(model, block_size=4), [(p, SamplingParams(**settings, n=2, best_of=4))])
    ranked = sorted(all4.outputs, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.index for c in best.outputs] == [0, 1]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked[:2]]
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob
    assert best.outputs[0].logprobs is None  # ranked by logprobs it computed, not asked to return


# --- 6. the request output --------------------------------------------------------------------------
def test_finish_and_stop_reasons_are_openais_and_errors_are_raised(char):
    model, tok = char
    llm = LLM(model, tok)
    greedy = llm.generate(["ROMEO:"], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    text, ids = greedy.outputs[0].text, greedy.outputs[0].token_ids
    assert greedy.prompt == "ROMEO:" and greedy.prompt_token_ids == tok.encode("ROMEO:")
    stop_string = text[10:12]
    by_string, by_token, by_length = llm.generate(
        ["ROMEO:"] * 3,
        [
            SamplingParams(max_tokens=40, temperature=0, stop=["\x00never", stop_string], ignore_eos=True),
            SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[ids[5]], ignore_eos=True),
            SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
        ],
    )
    assert by_string.outputs[0].finish_reason == "stop" and by_string.outputs[0].stop_reason == stop_string
    assert by_string.outputs[0].text == text[: text.index(stop_string)]
    first = ids.index(ids[5])
    assert by_token.outputs[0].token_ids == ids[: first + 1]
    assert (by_token.outputs[0].finish_reason, by_token.outputs[0].stop_reason) == ("stop", ids[5])
    assert (by_length.outputs[0].finish_reason, by_length.outputs[0].stop_reason) == ("length", None)
    engine = LLMEngine(model, tok)
    engine.add_request("ROMEO:", SamplingParams(max_tokens=40), "x")
    engine.step()
    aborted = engine.abort("x")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    for out in (greedy, by_string, by_token, by_length, aborted):
        assert all(c.finish_reason in FINISH_REASONS for c in out.outputs)
    # A request that fails while running raises; it is never a finish reason.
    poisoned = tiny(tie_embeddings=False)
    with torch.no_grad():
        poisoned.tok_emb.weight[7] = float("nan")
    with pytest.raises(RequestFailed, match="prompt 1: .*NaN") as failed:
        LLM(poisoned).generate([[1, 2], [1, 7, 2]], SamplingParams(max_tokens=4, temperature=0))
    assert failed.value.request_id is not None
