"""The inference engine against its oracles.

The oracle for every batched, paged, chunked, preempted, prefix-cached run is the one-request
path (:func:`scratchlm.generate.generate`, what ``scratchlm sample`` runs) on the same weights, and
Hugging Face ``generate`` on the weights exported with ``export_hf``. The block manager's
invariants are checked after every step (``check_invariants=True``).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from scratchlm.generate import generate
from scratchlm.generate.sampling import SamplingConfig
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.serve import LLM, LLMEngine, RequestFailed, RequestOutputKind, SamplingParams
from scratchlm.serve.async_engine import AsyncLLMEngine

GREEDY = SamplingConfig(temperature=0)


def tiny(position="rope", n_kv_head=2, vocab=97, block=96, seed=0, **kw) -> GPT:
    """Random weights with a large init: logits spread far apart, so greedy ties cannot hide bugs."""
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=vocab,
        n_layer=2,
        n_head=4,
        n_kv_head=n_kv_head,
        d_model=32,
        block_size=block,
        position=position,
        init_std=0.3,
        **kw,
    )
    return GPT(cfg).eval()


def prompts(n, low=1, high=40, vocab=97, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def oracle(model, prompt, n) -> list[int]:
    return generate(model, prompt, n, GREEDY)[0]


def drained(engine: LLMEngine) -> None:
    """Nothing left: every reference count 0 and the free list whole."""
    assert not engine.has_unfinished()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
    engine.blocks.check([])


# --- greedy equality with the one-request path ------------------------------------------------------
@pytest.mark.parametrize(
    "position,n_kv_head", [("rope", 2), ("learned", 4), ("alibi", 1), ("sinusoidal", 2), ("none", 2)]
)
def test_batched_paged_chunked_preempted_equals_one_at_a_time(position, n_kv_head):
    model = tiny(position, n_kv_head)
    ps = prompts(12)
    # 4-token blocks, 16 of them (64 slots for 12 requests of up to 60 tokens), 24 tokens per step:
    # long prompts are chunked, decodes share steps with prefills, and the pool runs out.
    llm = LLM(model, block_size=4, num_blocks=16, max_num_batched_tokens=24, check_invariants=True)
    outs = llm.generate(ps, SamplingParams(max_tokens=20, temperature=0))
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == oracle(model, p, 20)
        assert out.outputs[0].finish_reason == "length"
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0, stats
    drained(llm.engine)


@pytest.mark.parametrize("weight_format", ["dense", "onednn"])
def test_weight_formats_agree_and_leave_the_model_unchanged(weight_format):
    from scratchlm.serve.weights import resolve

    model = tiny("learned", 4, bias=True)
    if weight_format == "onednn" and resolve("auto", model) != "onednn":
        why = (
            "the onednn format needs a CPU PyTorch build whose oneDNN linear ops pass the self-check "
            "(absent on CUDA/MPS builds and some CPUs); the dense format is tested either way"
        )
        pytest.skip(reason=why)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llm = LLM(model, block_size=4, weight_format=weight_format)
    assert llm.engine.stats()["weight_format"] == weight_format
    ps = prompts(4)
    outs = llm.generate(ps, SamplingParams(max_tokens=10, temperature=0, logprobs=0))
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == oracle(model, p, 10)
        with torch.no_grad():
            logits, _ = model(torch.tensor([p + out.outputs[0].token_ids]))
        expected = torch.log_softmax(logits[0, len(p) - 1 : -1], -1).gather(
            1, torch.tensor(out.outputs[0].token_ids)[:, None]
        )
        torch.testing.assert_close(
            torch.tensor([r["logprob"] for r in out.outputs[0].logprobs]),
            expected[:, 0],
            atol=1e-4,
            rtol=1e-4,
        )
    from scratchlm.serve.weights import OneDNNLinear

    assert not any(
        isinstance(m, OneDNNLinear) for m in model.modules()
    )  # the caller's model is not converted
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_onednn_bfloat16_weights_agree_with_dense_bfloat16():
    from scratchlm.serve.weights import resolve

    model = tiny("rope", 2, bias=True).to(torch.bfloat16)
    if resolve("auto", model) != "onednn":
        why = (
            "bfloat16 oneDNN linears need a CPU PyTorch build whose oneDNN ops pass the self-check "
            "(absent on CUDA/MPS builds and CPUs without bf16 support); nothing to compare against otherwise"
        )
        pytest.skip(reason=why)
    ps = prompts(3)
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    dense = LLM(model, weight_format="dense").generate(ps, params)
    packed = LLM(model, weight_format="onednn").generate(ps, params)
    for d, p in zip(dense, packed):
        top_d, top_p = dict(d.outputs[0].logprobs[0]["top"]), dict(p.outputs[0].logprobs[0]["top"])
        assert max(abs(top_d[t] - top_p[t]) for t in top_d if t in top_p) < 0.05


def test_batched_equals_one_request_at_a_time_through_the_engine():
    model = tiny()
    ps = prompts(10, 1, 60)
    together = LLM(model, block_size=8, max_num_seqs=10).generate(
        ps, SamplingParams(max_tokens=12, temperature=0)
    )
    one = LLM(model, block_size=8, max_num_seqs=1)
    alone = [one.generate([p], SamplingParams(max_tokens=12, temperature=0))[0] for p in ps]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]


def test_logits_of_a_packed_step_equal_the_contiguous_model():
    """The paged attention of one packed step (a decode, a first chunk, a middle chunk) gives the
    logits the plain model gives each sequence alone, to float32 rounding."""
    model = tiny("alibi", 2)
    # A budget of 16 tokens packs decodes with first, middle and last chunks of the longer prompts.
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=16)
    ps = prompts(3, 20, 40)
    ids = [engine.add_request(p, SamplingParams(max_tokens=5, temperature=0, logprobs=3)) for p in ps]
    outs, kinds = {}, set()
    while engine.has_unfinished():
        chunks = engine.scheduler.schedule()
        kinds |= {
            (
                "decode"
                if n == 1
                else "first"
                if s.num_computed == 0
                else "last"
                if s.num_computed + n == s.num_tokens
                else "middle"
            )
            for s, n in chunks.chunks
        }
        for o in engine._run(chunks):
            outs[o.request_id] = o
    assert kinds == {"decode", "first", "middle", "last"}
    for p, rid in zip(ps, ids):
        o = outs[rid]
        tokens = p + o.outputs[0].token_ids
        with torch.no_grad():
            logits, _ = model(torch.tensor([tokens]))
        reference = torch.log_softmax(logits[0, len(p) - 1 : -1].float(), dim=-1)
        got = torch.tensor([r["logprob"] for r in o.outputs[0].logprobs])
        expected = reference.gather(1, torch.tensor(o.outputs[0].token_ids)[:, None])[:, 0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        top_ids = [[t for t, _ in r["top"]] for r in o.outputs[0].logprobs]
        assert top_ids == reference.topk(3).indices.tolist()


# --- prefix caching -----------------------------------------------------------------------------
def test_prefix_cache_hits_give_the_same_tokens_as_no_cache():
    model = tiny(block=128)
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 97, (40,), generator=g).tolist()  # 5 full blocks of 8
    cases = {
        "no hit": torch.randint(0, 97, (30,), generator=g).tolist(),
        "partial hit": shared[:21] + [1, 2, 3],  # blocks 0-1 shared (16 tokens), block 2 differs
        "block-aligned full hit": shared[:24],  # exactly 3 blocks: the last token is recomputed
        "whole prompt cached": list(shared),
    }
    params = SamplingParams(max_tokens=8, temperature=0)
    off = LLM(model, block_size=8, enable_prefix_caching=False)
    on = LLM(model, block_size=8, check_invariants=True)
    on.generate([shared], params)  # warm the cache
    for name, p in cases.items():
        got = on.generate([p], params)[0]
        assert (
            got.outputs[0].token_ids
            == off.generate([p], params)[0].outputs[0].token_ids
            == oracle(model, p, 8)
        ), name
        cached = got.metrics["cached_tokens"]
        expected = {"no hit": 0, "partial hit": 16, "block-aligned full hit": 16, "whole prompt cached": 32}[
            name
        ]
        assert cached == expected, (name, cached)
    drained(on.engine)


def test_two_requests_sharing_a_prefix_concurrently():
    model = tiny(block=128)
    g = torch.Generator().manual_seed(4)
    shared = torch.randint(0, 97, (48,), generator=g).tolist()
    ps = [shared + torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 9, 13, 3)]
    params = SamplingParams(max_tokens=10, temperature=0)
    engine = LLMEngine(model, block_size=8, check_invariants=True)
    engine.add_request(ps[0], params, "first")
    engine.step()  # the first request's prompt is computed and its blocks cached
    for i, p in enumerate(ps[1:]):
        engine.add_request(p, params, f"r{i}")
    shared_blocks = set()
    outs = {}
    while engine.has_unfinished():
        running = engine.scheduler.running
        if len(running) > 1:
            tables = [set(s.block_table[:6]) for s in running]
            shared_blocks |= set.intersection(*tables)
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    assert len(shared_blocks) == 6  # the 48-token prefix: 6 blocks in every table at once
    for rid, p in zip(["first", "r0", "r1", "r2"], ps):
        assert outs[rid].outputs[0].token_ids == oracle(model, p, 10)
    assert [outs[f"r{i}"].metrics["cached_tokens"] for i in range(3)] == [48, 48, 48]
    drained(engine)


def test_freed_cached_blocks_are_evicted_least_recently_used_first():
    model = tiny(block=128)
    engine = LLMEngine(model, block_size=4, num_blocks=12, check_invariants=True)
    params = SamplingParams(max_tokens=1, temperature=0)
    a, b = list(range(1, 17)), list(range(30, 46))  # 4 blocks each (the last token's block is recomputed)
    for p in (a, b):
        engine.add_request(p, params)
        while engine.has_unfinished():
            engine.step()
    c = list(range(50, 70))  # needs 5 blocks: 12 - 8 cached leaves 4 never-cached, so a's oldest go
    engine.add_request(c, params)
    while engine.has_unfinished():
        engine.step()
    # b was used last: all of its full blocks are still cached; a lost some.
    engine.add_request(b, params, "b")
    out = [o for o in engine.step() if o.request_id == "b"][0]
    assert out.metrics["cached_tokens"] == 12
    drained(engine)


# --- sampling per request ------------------------------------------------------------------
def test_seeded_sampling_is_the_same_alone_batched_and_on_the_one_request_path():
    model = tiny()
    ps = prompts(6, 5, 30)
    sampled = SamplingParams(max_tokens=15, temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    mixed = [sampled if i % 2 == 0 else SamplingParams(max_tokens=15, temperature=0) for i in range(6)]
    batched = LLM(model, block_size=4).generate(ps, mixed)
    for i in range(0, 6, 2):
        alone = LLM(model, block_size=4).generate([ps[i]], sampled)[0]
        reference = generate(model, ps[i], 15, SamplingConfig(0.9, 20, 0.9), seed=1234)[0]
        assert batched[i].outputs[0].token_ids == alone.outputs[0].token_ids == reference
    for i in range(1, 6, 2):
        assert batched[i].outputs[0].token_ids == oracle(model, ps[i], 15)


def test_repetition_penalty_and_min_p_match_the_one_request_path():
    model = tiny()
    p = prompts(1, 10, 11)[0]
    params = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.8)
    got = LLM(model).generate([p], params)[0].outputs[0].token_ids
    assert got == generate(model, p, 12, SamplingConfig(temperature=0, repetition_penalty=1.8))[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, min_p=0.2, seed=7)
    got = LLM(model).generate([p], params)[0].outputs[0].token_ids
    assert got == generate(model, p, 12, SamplingConfig(temperature=1.0, min_p=0.2), seed=7)[0]


def test_generation_stops_at_the_context_with_length():
    """As in vLLM: max_tokens is a cap; a request stops where prompt + output fill the context, with
    the tokens the one-request path gives (which never needs its window to slide there)."""
    model = tiny(block=24)
    engine = LLMEngine(model, block_size=4, check_invariants=True)
    p = prompts(1, 10, 11)[0]
    engine.add_request(p, SamplingParams(max_tokens=500, temperature=0), "long")
    engine.add_request(list(range(23)), SamplingParams(max_tokens=5, temperature=0), "one")
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert (
        outs["long"].outputs[0].finish_reason == "length"
        and len(p) + len(outs["long"].outputs[0].token_ids) == 24
    )
    assert outs["long"].outputs[0].token_ids == oracle(model, p, 24 - len(p))
    assert outs["one"].outputs[0].finish_reason == "length" and len(outs["one"].outputs[0].token_ids) == 1
    drained(engine)


def test_stop_token_ids_and_max_tokens():
    model = tiny()
    p = prompts(1, 10, 11)[0]
    ref = oracle(model, p, 20)
    stop_at = ref[5]
    first = ref.index(stop_at)
    out = LLM(model).generate([p], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.outputs[0].token_ids == ref[: first + 1] and out.outputs[0].finish_reason == "stop"


# --- with a tokenizer: text, stop strings, EOS -----------------------------------------------------
@pytest.fixture(scope="module")
def char_model(char_shards, tmp_path_factory):
    """A character model trained for a few seconds: real text, a real tokenizer, a checkpoint."""
    from scratchlm.train import train

    out = tmp_path_factory.mktemp("engine") / "run"
    train(
        {
            "model": {
                "n_layer": 2,
                "n_head": 4,
                "n_kv_head": 2,
                "d_model": 64,
                "block_size": 128,
                "position": "rope",
                "norm": "rmsnorm",
                "mlp": "swiglu",
                "bias": False,
            },
            "train": {
                "data": str(char_shards),
                "out_dir": str(out),
                "batch_size": 16,
                "max_steps": 150,
                "eval_interval": 150,
                "eval_windows": 8,
                "warmup_steps": 10,
                "sample_tokens": 0,
                "lr": 1e-2,
                "log_interval": 50,
            },
        },
        progress=False,
    )
    return out / "last"


def test_text_and_stop_strings_match_sample(char_model):
    from scratchlm.generate import generate_text

    llm = LLM(char_model)
    tok = llm.engine.tokenizer
    model = llm.engine.model
    for prompt, stop in [("ROMEO:\n", ["\n\n"]), ("First Citizen:", [":"]), ("KING", [])]:
        out = llm.generate([prompt], SamplingParams(max_tokens=80, temperature=0, stop=stop))[0]
        expected = generate_text(model, tok, prompt, 80, GREEDY, stop=stop)
        assert out.outputs[0].text == expected
        cut = any(s in tok.decode(out.outputs[0].token_ids) for s in stop)
        assert out.outputs[0].finish_reason == ("stop" if cut else "length")


def test_bfloat16_greedy_matches_float32_on_a_trained_model(char_model):
    p32 = LLM(char_model, dtype="float32")
    p16 = LLM(char_model, dtype="bfloat16")
    assert p16.engine.runner.pool.k.dtype == torch.bfloat16
    prompts_ = ["ROMEO:\n", "First Citizen:\nWe are", "KING HENRY"]
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=0)
    a, b = p32.generate(prompts_, params), p16.generate(prompts_, params)
    agree = sum(
        x == y for o32, o16 in zip(a, b) for x, y in zip(o32.outputs[0].token_ids, o16.outputs[0].token_ids)
    )
    assert agree >= 0.9 * sum(len(o.outputs[0].token_ids) for o in a), (
        agree,
        [o.outputs[0].text for o in a],
        [o.outputs[0].text for o in b],
    )
    # Until the first disagreement the two follow the same text: their log-probabilities agree to bf16 precision.
    for o32, o16 in zip(a, b):
        for x, y in zip(o32.outputs[0].logprobs, o16.outputs[0].logprobs):
            if x["token"] != y["token"]:
                break
            assert abs(x["logprob"] - y["logprob"]) < 0.1


# --- bad input: one request fails, the others are served ----------------------------------------------
@pytest.mark.parametrize(
    "prompt,fields,message",
    [
        ([], {}, "prompt is empty"),
        (list(range(96)), {}, "the prompt is 96 tokens; this model's context is 96 tokens"),
        (list(range(96)) + [1], {}, "shorten the prompt to at most 95 tokens"),
        ([1, 500], {}, "outside the vocabulary"),
        ([1, 2], {"temperature": -1}, "temperature must be"),
        ([1, 2], {"top_p": 0}, "top_p must be"),
        ([1, 2], {"top_p": 1.5}, "top_p must be"),
        ([1, 2], {"max_tokens": 0}, "max_tokens must be"),
        ([1, 2], {"stop": ["x"]}, "stop strings need a tokenizer"),
        ([1, 2], {"bogus": 1}, "unknown sampling field"),
        ("text", {}, "text prompt needs a tokenizer"),
    ],
)
def test_a_bad_request_fails_alone(prompt, fields, message):
    model = tiny()
    engine = LLMEngine(model, block_size=4, check_invariants=True)
    good = prompts(2, 5, 10)
    engine.add_request(good[0], SamplingParams(max_tokens=6, temperature=0), "good0")
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams.from_dict({"temperature": 0, **fields}))
    engine.add_request(good[1], SamplingParams(max_tokens=6, temperature=0), "good1")
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["good0"].outputs[0].token_ids == oracle(model, good[0], 6)
    assert outs["good1"].outputs[0].token_ids == oracle(model, good[1], 6)
    drained(engine)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"top_k": True}, "top_k must be"),
        ({"max_tokens": True}, "max_tokens must be"),
        ({"stop": 5}, "stop must be"),
        ({"stop_token_ids": 5}, "stop_token_ids must be"),
        ({"temperature": float("inf")}, "temperature must be"),
        ({"ignore_eos": "no"}, "ignore_eos must be"),
        ({"seed": True}, "seed must be"),
    ],
)
def test_sampling_params_reject_booleans_and_wrong_types(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_dict(fields)


def test_a_tiny_temperature_is_greedy_and_logprobs_beyond_the_vocabulary_are_clamped():
    model = tiny(vocab=12)
    p = prompts(1, 5, 6, vocab=12)[0]
    out = LLM(model).generate([p], SamplingParams(max_tokens=8, temperature=1e-30, logprobs=20))[0]
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == oracle(model, p, 8)
    assert all(len(r["top"]) == 12 for r in out.outputs[0].logprobs)


def poisoned_model():
    """Token 7's embedding is NaN: every key and value after it is NaN (untied: tied, every logit
    row would hold the NaN)."""
    model = tiny(block=96, tie_embeddings=False)
    with torch.no_grad():
        model.tok_emb.weight[7] = float("nan")
    return model


def test_nan_logits_fail_that_request_only_and_never_reach_other_requests():
    """A request whose keys and values are NaN ends with an error; the others in the same steps,
    and later ones that reuse its blocks (stale slots past their own length included), equal the
    oracle. Its blocks may leave the engine three ways: it fails at sampling, it is aborted in the
    middle of a chunked prefill, or it is preempted there."""
    model = poisoned_model()
    good = [p for p in prompts(40, 2, 14, seed=9) if 7 not in p]
    bad_prompt = [1, 2, 3, 7] + list(range(20, 44))

    def run(engine, before, after, abort_bad_after=None, n=3):
        ids = {engine.add_request(p, SamplingParams(max_tokens=n, temperature=0)): p for p in before}
        bad = engine.add_request(bad_prompt, SamplingParams(max_tokens=4, temperature=0))
        ids.update({engine.add_request(p, SamplingParams(max_tokens=n, temperature=0)): p for p in after})
        outs, steps = {}, 0
        while engine.has_unfinished():
            outs.update({o.request_id: o for o in engine.step() if o.finished})
            assert all(o.error is None for rid, o in outs.items() if rid != bad)
            steps += 1
            if steps == abort_bad_after:
                outs[bad] = engine.abort(bad)
        for rid, p in ids.items():
            assert outs[rid].outputs[0].finish_reason == "length" and outs[rid].outputs[
                0
            ].token_ids == oracle(model, p, n), rid
        drained(engine)
        return outs[bad]

    for caching in (True, False):
        # fails at sampling
        engine = LLMEngine(
            model,
            block_size=4,
            num_blocks=24,
            max_num_batched_tokens=32,
            enable_prefix_caching=caching,
            check_invariants=True,
        )
        out = run(engine, good[:3], good[3:20])
        assert isinstance(out.error, RequestFailed) and "NaN" in str(out.error) and out.outputs == []
        # aborted after 2 chunks of its prefill: its NaN blocks go back without ever being sampled
        engine = LLMEngine(
            model,
            block_size=4,
            num_blocks=10,
            max_num_batched_tokens=8,
            enable_prefix_caching=caching,
            check_invariants=True,
        )
        assert run(engine, [], good[20:30], abort_bad_after=2).outputs[0].finish_reason == "abort"
    # preempted in the middle of its prefill (a small pool), its blocks reused by the others
    engine = LLMEngine(
        model,
        block_size=4,
        num_blocks=14,
        max_num_batched_tokens=8,
        max_num_seqs=4,
        enable_prefix_caching=False,
        check_invariants=True,
    )
    run(engine, good[:3], good[3:12], n=10)
    assert engine.stats()["preemptions"] > 0


def test_an_infinite_logit_fails_its_own_row_not_its_sampling_group():
    from scratchlm.serve.sampler import sample
    from scratchlm.serve.sequence import Sequence

    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    logits[1, 3] = float("inf")
    for params in (SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0)):
        seqs = [Sequence([1], params) for _ in range(4)]
        tokens, _, errors = sample(logits, seqs)
        assert tokens[1] is None and "infinite" in errors[1]
        assert all(t is not None for i, t in enumerate(tokens) if i != 1) and errors.count(None) == 3


def test_only_the_tokenizers_ids_are_sampled_from_a_padded_vocabulary(char_model):
    """A model's vocabulary may be padded past its tokenizer's (GPT-2: 50257 -> 50304); those ids
    mean nothing and cannot be decoded, so they are never sampled."""
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint

    model, state = load_model_from_checkpoint(char_model, "cpu")
    tok = load_checkpoint_tokenizer(char_model, state)
    padded = GPT(GPTConfig(**{**model.config.__dict__, "vocab_size": tok.vocab_size + 40})).eval()
    with torch.no_grad():
        padded.lm_head.weight.zero_()
        padded.lm_head.weight[tok.vocab_size :] = 5.0  # the padding ids would win every draw
    outs = LLM(padded, tok).generate(
        ["ROMEO:"] * 3, [SamplingParams(max_tokens=10, temperature=t, seed=1) for t in (0, 1.0, 0.7)]
    )
    for out in outs:
        assert out.outputs[0].finish_reason == "length" and max(out.outputs[0].token_ids) < tok.vocab_size
    with pytest.raises(ValueError, match="not this model's tokenizer"):
        LLMEngine(tiny(vocab=10), tok)


def test_an_interrupted_generate_leaves_no_request_behind(monkeypatch):
    llm = LLM(tiny(), block_size=4)
    step, calls = llm.engine.step, []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts(4, 5, 20), SamplingParams(max_tokens=30, temperature=0))
    assert not llm.engine.requests
    drained(llm.engine)


def test_a_request_larger_than_the_whole_cache_is_refused():
    engine = LLMEngine(tiny(), block_size=4, num_blocks=3)
    with pytest.raises(ValueError, match="needs up to 4 KV blocks"):
        engine.add_request([1] * 10, SamplingParams(max_tokens=6))
    engine.add_request([1] * 6, SamplingParams(max_tokens=6))  # 12 tokens = 3 blocks: fits alone
    while engine.has_unfinished():
        engine.step()
    drained(engine)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"block_size": 0}, r"block_size must be an integer >= 1 \(tokens per KV block\), got 0"),
        ({"num_blocks": 0}, "num_blocks must be an integer >= 1"),
        ({"kv_cache_gb": -1.0}, "kv_cache_gb must be a number > 0"),
        ({"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1"),
        ({"max_num_batched_tokens": -3}, "max_num_batched_tokens must be an integer >= 1"),
    ],
)
def test_engine_options_are_checked_when_made(options, message):
    with pytest.raises(ValueError, match=message):
        LLMEngine(tiny(), **options)


# --- random workloads against the oracle -------------------------------------------------------------
def test_random_workloads_with_arrivals_and_aborts_match_the_oracle():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    model = tiny(block=64)
    request = st.tuples(
        st.lists(st.integers(0, 96), min_size=1, max_size=30),  # prompt
        st.integers(1, 12),  # max_tokens
        st.integers(0, 6),  # arrives after this many steps
        st.one_of(st.none(), st.integers(0, 8)),
    )  # aborted after this many of its steps

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(
        st.lists(request, min_size=1, max_size=8),
        st.sampled_from([2, 4, 8]),
        st.integers(6, 40),
        st.integers(4, 40),
        st.booleans(),
    )
    def run(requests, block_size, num_blocks, budget, caching):
        needed = max(-(-(len(p) + n) // block_size) for p, n, _, _ in requests)
        engine = LLMEngine(
            model,
            block_size=block_size,
            num_blocks=max(num_blocks, needed),
            max_num_batched_tokens=budget,
            enable_prefix_caching=caching,
            check_invariants=True,
        )
        pending = sorted(enumerate(requests), key=lambda r: r[1][2])
        finished, steps_seen, step = {}, {}, 0
        while pending or engine.has_unfinished():
            while pending and pending[0][1][2] <= step:
                i, (p, n, _, _) = pending.pop(0)
                engine.add_request(p, SamplingParams(max_tokens=n, temperature=0), str(i))
            for i, (_p, _n, _, abort_after) in enumerate(requests):
                rid = str(i)
                if (
                    rid in engine.requests
                    and abort_after is not None
                    and steps_seen.get(rid, 0) >= abort_after
                ):
                    finished[rid] = engine.abort(rid)
            for o in engine.step():
                steps_seen[o.request_id] = steps_seen.get(o.request_id, 0) + 1
                if o.finished:
                    finished[o.request_id] = o
            step += 1
        for i, (p, n, _, _) in enumerate(requests):
            out = finished[str(i)]
            expected = oracle(model, p, n)
            if out.outputs[0].finish_reason == "abort":
                assert out.outputs[0].token_ids == expected[: len(out.outputs[0].token_ids)]
            else:
                assert out.outputs[0].token_ids == expected
        drained(engine)

    run()


# --- the async interface a server drives -----------------------------------------------------------
def test_async_streaming_cancel_and_bad_request():
    model = tiny()
    engine = AsyncLLMEngine(LLMEngine(model, block_size=4, check_invariants=True))
    ps = prompts(4, 5, 20)

    async def collect(p, n):
        tokens = []
        params = SamplingParams(max_tokens=n, temperature=0, output_kind=RequestOutputKind.DELTA)
        async for out in engine.generate(p, params):
            tokens += out.outputs[0].token_ids
        return tokens, out.outputs[0].finish_reason

    async def cancelled(p):
        async for out in engine.generate(p, SamplingParams(max_tokens=60, temperature=0)):
            if len(out.outputs[0].token_ids) == 3:
                break  # the client went away: the request must be aborted and its blocks freed

    async def bad():
        with pytest.raises(ValueError, match="temperature"):
            async for _ in engine.generate([1, 2], SamplingParams.from_dict({"temperature": -1})):
                pass

    async def main():
        return await asyncio.gather(*(collect(p, 10 + i) for i, p in enumerate(ps)), cancelled(ps[0]), bad())

    results = asyncio.run(main())
    for i, p in enumerate(ps):
        assert results[i] == (oracle(model, p, 10 + i), "length")
    for _ in range(200):  # the abort of the cancelled request reaches the engine thread
        if not engine.engine.requests:
            break
        import time

        time.sleep(0.01)
    drained(engine.engine)  # before shutdown, which would clear the engine anyway
    engine.shutdown()


def test_async_abort_collisions_cancellation_failures_and_shutdown(monkeypatch):
    model = tiny()
    llm = LLMEngine(model, block_size=4, check_invariants=True)
    engine = AsyncLLMEngine(llm)
    ps = prompts(3, 5, 20)
    params = SamplingParams(max_tokens=40, temperature=0)

    async def consume(p, request_id=None, params=params, started=None):
        outs = []
        async for out in engine.generate(p, params, request_id):
            assert (
                not outs or len(out.outputs[0].token_ids) > len(outs[-1].outputs[0].token_ids) or out.finished
            )
            outs.append(out)
            if started is not None:
                started.set()
        return outs[-1]

    async def main():
        # Each step takes 20 ms more, so a request that has begun is still running when
        # the test acts on it, however fast the machine (events, not sleeps, say when it began).
        slow = llm.step

        def slow_step():
            import time

            time.sleep(0.02)
            return slow()

        monkeypatch.setattr(llm, "step", slow_step)
        # 1. abort(): the consumer gets a last output with finish_reason "abort", not a hang
        # (aborted once its first tokens arrived: a fixed sleep raced a fast engine to the end)
        started = asyncio.Event()
        task = asyncio.ensure_future(consume(ps[0], "x", started=started))
        await asyncio.wait_for(started.wait(), 10)
        engine.abort("x")
        aborted = await asyncio.wait_for(task, 10)
        assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
        # 2. a second request with an id in use is refused, and the first goes on untouched
        started = asyncio.Event()
        first = asyncio.ensure_future(consume(ps[1], "same", started=started))
        await asyncio.wait_for(started.wait(), 10)
        with pytest.raises(ValueError, match="already in use"):
            await consume(ps[2], "same")
        done = await asyncio.wait_for(first, 30)
        assert done.outputs[0].finish_reason == "length" and done.outputs[0].token_ids == oracle(
            model, ps[1], 40
        )
        # 3. cancelled while its admission is pending (the engine busy with a step): no crash, no leak
        started = asyncio.Event()
        busy = asyncio.ensure_future(consume(ps[0], started=started))
        await asyncio.wait_for(started.wait(), 10)
        for _ in range(5):
            pending = asyncio.ensure_future(consume(ps[2]))
            await asyncio.sleep(0)
            pending.cancel()
        assert (await asyncio.wait_for(busy, 30)).outputs[0].token_ids == oracle(model, ps[0], 40)
        # 4. a non-ValueError while queueing fails that request only
        enqueue = llm.enqueue

        def broken_enqueue(request):
            if request.prompt_ids == [13, 13]:
                raise KeyError("a bug")
            return enqueue(request)

        monkeypatch.setattr(llm, "enqueue", broken_enqueue)
        with pytest.raises(KeyError):
            await consume([13, 13])
        assert (await consume(ps[2])).outputs[0].token_ids == oracle(model, ps[2], 40)
        assert engine._thread.is_alive()
        # every cancelled or aborted request has left the engine (before shutdown, which clears it)
        for _ in range(200):
            if not llm.requests and llm.blocks.num_free == llm.blocks.num_blocks:
                break
            await asyncio.sleep(0.01)
        assert not llm.requests and llm.blocks.num_free == llm.blocks.num_blocks
        # 5. shutdown with a request in flight: its consumer gets an error instead of waiting forever
        started = asyncio.Event()
        hanging = asyncio.ensure_future(
            consume(ps[1], params=SamplingParams(max_tokens=70, temperature=0), started=started)
        )
        await asyncio.wait_for(started.wait(), 10)
        await engine.shutdown_async()
        with pytest.raises(RuntimeError, match="shut down"):
            await asyncio.wait_for(hanging, 10)
        with pytest.raises(RuntimeError, match="shut down"):
            await consume(ps[0])

    asyncio.run(main())
    drained(llm)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(monkeypatch):
    model = tiny()
    llm = LLMEngine(model, block_size=4)
    engine = AsyncLLMEngine(llm)
    step, calls = llm.step, []

    def flaky():
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("a transient out-of-memory")
        return step()

    monkeypatch.setattr(llm, "step", flaky)
    p = prompts(1, 5, 6)[0]

    async def main():
        with pytest.raises(RuntimeError, match="MemoryError"):
            async for _ in engine.generate(p, SamplingParams(max_tokens=5, temperature=0)):
                pass
        outs = [o async for o in engine.generate(p, SamplingParams(max_tokens=5, temperature=0))]
        assert outs[-1].outputs[0].token_ids == oracle(model, p, 5)
        await engine.shutdown_async()
        with pytest.raises(RuntimeError, match="the engine is shut down"):  # not "stopped after an error"
            async for _ in engine.generate(p, SamplingParams(max_tokens=5)):
                pass

    asyncio.run(asyncio.wait_for(main(), 30))
    assert isinstance(engine.last_step_error, MemoryError) and engine.error is None
    drained(llm)


def test_async_engine_thread_failure_reaches_every_waiting_consumer(monkeypatch):
    llm = LLMEngine(tiny(), block_size=4)
    engine = AsyncLLMEngine(llm)
    monkeypatch.setattr(llm, "has_unfinished", lambda: 1 / 0)  # a bug in the loop itself

    async def main():
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=5)):
                pass
        with pytest.raises(RuntimeError, match="stopped after an error"):
            async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=5)):
                pass

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_long_prompt_does_not_stall_running_decodes():
    """Chunked prefill: while a 60-token prompt is computed 8 tokens per step, the running request
    still gets one token every step."""
    engine = LLMEngine(tiny(), block_size=4, max_num_batched_tokens=8, check_invariants=True)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=30, temperature=0), "running")
    engine.step()
    engine.add_request(prompts(1, 60, 61)[0], SamplingParams(max_tokens=3, temperature=0), "long")
    steps_until_first_token = 0
    while True:
        outs = {o.request_id: o for o in engine.step()}
        steps_until_first_token += 1
        assert "running" in outs  # a token every step
        if "long" in outs:
            break
    assert steps_until_first_token == 9  # 60 tokens at 7 a step (one of the 8 goes to the decode)


def test_cli_generate_writes_outputs_in_order_with_errors_per_line_and_never_imports_the_trainer(
    char_model, tmp_path
):
    import json
    import subprocess
    import sys

    lines = [
        {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0},
        {"prompt": "JULIET:", "max_tokens": 20, "temperature": 0.8, "seed": 3, "stop": ["\n\n"]},
        {"prompt": "KING:", "max_tokens": 5000},  # beyond the context: stops there, "length"
        {"prompt": "QUEEN:", "max_tokens": 8, "temperatur": 0.5},  # a typo is an error, not ignored
        {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0, "id": "again"},
    ]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    out = tmp_path / "out.jsonl"
    code = (
        "import sys\nfrom scratchlm.cli import main\n"
        f"rc = main(['generate', '--checkpoint', {str(char_model)!r}, '--prompts', {str(src)!r}, '--out', "
        f"{str(out)!r}, '--json'])\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('scratchlm.train'))\n"
        "assert not loaded, loaded\nsys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "2 of 6 requests failed" in done.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in results] == list(range(6))
    assert results[2]["finish_reason"] == "length" and "error" not in results[2]
    assert results[2]["prompt_tokens"] + results[2]["completion_tokens"] == 128  # the model's context
    assert "unknown sampling field" in results[3]["error"]
    assert "line 6" in results[5]["error"]
    assert results[4]["id"] == "again" and results[4]["text"] == results[0]["text"]
    assert results[0]["completion_tokens"] == 20 and results[0]["finish_reason"] == "length"
    assert results[4]["cached_tokens"] == 0  # 6 prompt tokens: not one full block to share
    reference = LLM(char_model).generate(["ROMEO:"], SamplingParams(max_tokens=20, temperature=0))[0]
    assert results[0]["text"] == reference.outputs[0].text


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_greedy_equals_hugging_face_generate_on_exported_weights(shape, tmp_path):
    """The engine, `scratchlm sample`'s path and HF `generate` on the same weights (exported with
    export_hf): identical greedy tokens, for GPT-2 and Llama shapes, batched with chunked prefill."""
    transformers = pytest.importorskip("transformers")
    from scratchlm.models.hf import export_hf

    if shape == "gpt2":
        model = tiny("learned", 4, vocab=101, block=64, mlp="gelu_tanh", bias=True)
    else:
        model = tiny(
            "rope", 2, vocab=101, block=64, norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False
        )
    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ps = prompts(6, 3, 30, vocab=101, seed=5)
    outs = LLM(model, block_size=4, max_num_batched_tokens=16, check_invariants=True).generate(
        ps, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    for p, out in zip(ps, outs):
        with torch.no_grad():
            ids = torch.tensor(
                [p]
            )  # an explicit mask: HF would otherwise mask every token equal to pad_token_id
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
            )[0, len(p) :].tolist()
        assert out.outputs[0].token_ids == ref == oracle(model, p, 12)
