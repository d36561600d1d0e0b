"""Constitutional AI loop: principles files, programmatic checks on hand
cases, and the whole loop — generate, critique, revise, collect, train — through the CLI on a
tiny assistant, with its revisions checked by an independent oracle; the model-as-critic and
scorer paths."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from scratchlm.posttrain.critique.critics import Constitution, load_scorer
from scratchlm.posttrain.critique.loop import critique_revise
from scratchlm.posttrain.critique.principles import (
    Critique,
    Evaluation,
    check_reply,
    load_principles,
    parse_principles,
)

PRINCIPLES = [
    {"name": "concise", "text": "at most 10 characters", "check": {"kind": "max_chars", "limit": 10}},
    {
        "name": "no_hedging",
        "text": "never say maybe",
        "check": {"kind": "forbidden_words", "words": ["maybe"]},
    },
    {
        "name": "format",
        "text": "reply as answer and the number",
        "check": {"kind": "regex", "pattern": r"answer \d+"},
    },
]
STYLES = ["{a}", "maybe {a}", "the answer is {a}", "answer maybe {a}", "answer {a}"]


def oracle(text: str, ended: bool = True) -> tuple[int, float]:
    """PRINCIPLES' key, written out by hand: (rules satisfied + ended, summed scores)."""
    t = text.strip()
    maybes = len(re.findall(r"\bmaybe\b", t, re.IGNORECASE))
    passed = [len(t) <= 10, maybes == 0, re.fullmatch(r"answer \d+", t) is not None]
    scores = [1.0 if passed[0] else 10 / len(t), 1 / (1 + maybes), float(passed[2])]
    return sum(passed) + ended, round(sum(scores), 9)


# --- principles files --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x"}, "expected a non-empty JSON list of principles"),
        ([], "expected a non-empty JSON list"),
        (["be nice"], "principle 0: expected an object"),
        ([{"name": "a", "text": "t"}], "expected exactly the keys name, text and check"),
        ([{"name": "a b", "text": "t", "check": {"kind": "max_chars", "limit": 3}}], "name must be a word"),
        (
            [{"name": "a", "text": " ", "check": {"kind": "max_chars", "limit": 3}}],
            "text must be a non-empty string",
        ),
        (
            [{"name": "a", "text": "t", "check": {"kind": "max_lenght", "limit": 3}}],
            "kind among ['forbidden_words', ",
        ),
        (
            [{"name": "a", "text": "t", "check": {"kind": "max_chars"}}],
            "check kind 'max_chars' needs 'limit': an integer >= 0",
        ),
        (
            [{"name": "a", "text": "t", "check": {"kind": "max_chars", "limit": "3"}}],
            "check.limit must be an integer >= 0, got '3'",
        ),
        (
            [{"name": "a", "text": "t", "check": {"kind": "max_chars", "limit": 3, "max": 4}}],
            "has no field(s) ['max']",
        ),
        (
            [{"name": "a", "text": "t", "check": {"kind": "forbidden_words", "words": []}}],
            "words must be a non-empty list",
        ),
        (
            [{"name": "a", "text": "t", "check": {"kind": "regex", "pattern": "(unclosed"}}],
            "check.pattern must be a regular",
        ),
        (
            [{"name": "a", "text": "t", "check": {"kind": "regex", "pattern": "x", "mode": "match"}}],
            'check.mode must be "fullmatch"',
        ),
        ([{"name": "a", "text": "t", "check": {"kind": "scorer"}}], "needs 'name'"),
        (
            [
                {"name": "a", "text": "t", "check": {"kind": "max_chars", "limit": 3}},
                {"name": "a", "text": "u", "check": {"kind": "max_words", "limit": 3}},
            ],
            "principle 1 ('a'): the name is used twice",
        ),
    ],
)
def test_principles_are_validated_with_errors_that_say_what_was_expected(data, message):
    with pytest.raises(ValueError) as e:
        parse_principles(data, "p.json")
    assert message in str(e.value) and str(e.value).startswith("p.json")


def test_principles_file_fills_defaults_and_bad_json_names_the_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(PRINCIPLES + [{"name": "judge", "text": "be kind", "check": {"kind": "model"}}])
    )
    loaded = load_principles(path)
    assert [p.name for p in loaded] == ["concise", "no_hedging", "format", "judge"]
    assert loaded[1].check == {"kind": "forbidden_words", "words": ["maybe"], "case_sensitive": False}
    assert loaded[2].check["mode"] == "fullmatch" and loaded[3].check == {
        "kind": "model",
        "checkpoint": None,
        "pass": "yes",
        "max_tokens": 16,
    }
    path.write_text("[{broken")
    with pytest.raises(ValueError, match=r"p\.json: not valid JSON"):
        load_principles(path)
    with pytest.raises(FileNotFoundError, match="no such principles file"):
        load_principles(tmp_path / "missing.json")


# --- programmatic checks -----------------------------------------------------------------------
def test_length_checks_count_characters_and_words_of_the_stripped_reply():
    assert check_reply({"kind": "max_chars", "limit": 5}, "  abcde \n") == Critique(True, 1.0, "")
    c = check_reply({"kind": "max_chars", "limit": 5}, "abcdefghij")
    assert not c.satisfied and c.score == 0.5 and c.text == "it has 10 characters, more than 5"
    assert check_reply({"kind": "min_chars", "limit": 4}, "ab").score == 0.5
    assert check_reply({"kind": "max_words", "limit": 2}, "one two").satisfied
    c = check_reply({"kind": "max_words", "limit": 2}, "one  two three four")
    assert not c.satisfied and c.score == 0.5 and c.text == "it has 4 words, more than 2"
    c = check_reply({"kind": "min_words", "limit": 3}, "one")
    assert not c.satisfied and c.text == "it has 1 words, fewer than 3"


def test_forbidden_words_match_whole_words_and_case_as_asked():
    check = {"kind": "forbidden_words", "words": ["maybe", "think"], "case_sensitive": False}
    assert check_reply(check, "maybelline thinks").satisfied  # whole words only
    c = check_reply(check, "Maybe 4, maybe 5, I think")
    assert (
        not c.satisfied and c.text == "it says maybe and think" and c.score == pytest.approx(1 / 4)
    )  # 3 hits
    assert check_reply({**check, "case_sensitive": True}, "Maybe 4").satisfied
    assert not check_reply(
        {"kind": "forbidden_words", "words": ["c++"], "case_sensitive": False}, "use C++ here"
    ).satisfied


def test_regex_modes_and_hint():
    fmt = {"kind": "regex", "pattern": r"answer \d+", "mode": "fullmatch", "hint": None}
    assert check_reply(fmt, " answer 42\n").satisfied
    assert check_reply(fmt, "answer 42 i think") == Critique(False, 0.0, "its form is wrong")
    assert check_reply({**fmt, "mode": "search"}, "so: answer 42 i think").satisfied
    absent = {"kind": "regex", "pattern": r"https?://", "mode": "absent", "hint": "no links please"}
    assert check_reply(absent, "see http://x.org") == Critique(False, 0.0, "no links please")
    assert check_reply(absent, "see the manual").satisfied


def test_evaluations_order_replies_and_an_unfinished_reply_never_complies():
    constitution = Constitution(parse_principles(PRINCIPLES))
    replies = ["answer 4", "4", "maybe 4", "the answer is 4", "answer maybe 4"]
    evals = constitution.evaluate([[{"role": "user", "content": "2+2="}]] * len(replies), replies)
    assert [e.complies for e in evals] == [True, False, False, False, False]
    assert [e.key for e in evals] == [oracle(r) for r in replies]
    assert sorted(replies, key=lambda r: evals[replies.index(r)].key, reverse=True)[:2] == ["answer 4", "4"]
    unfinished = Evaluation(evals[0].critiques, ended=False)
    assert not unfinished.complies and unfinished.key < evals[0].key


def test_scorers_are_critics_and_missing_ones_are_named():
    principles = parse_principles(
        [{"name": "short", "text": "be short", "check": {"kind": "scorer", "name": "len", "threshold": -3}}]
    )
    seen = []

    def minus_length(prompt, reply):
        seen.append(prompt[-1]["content"])
        return -len(reply)

    evals = Constitution(principles, scorers={"len": minus_length}).evaluate(
        [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]], ["abc", "abcd"]
    )
    assert seen == ["q1", "q2"] and [e.complies for e in evals] == [True, False]
    assert evals[1].critiques[0] == Critique(False, -4.0, "it scores -4, below -3")
    with pytest.raises(ValueError, match="asks for the scorer 'len', but none of that name was given"):
        Constitution(principles)
    assert load_scorer("os.path:basename")("a/b") == "b"
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        load_scorer("os.path.basename")
    with pytest.raises(ValueError, match="cannot import it"):
        load_scorer("no_such_module_xyz:f")


# --- the loop on a tiny assistant --------------------------------------------------------------
@pytest.fixture(scope="module")
def assistant(tmp_path_factory):
    """A tiny chat model fine-tuned to answer 1-digit additions in STYLES (one of which follows
    every principle) and, a quarter of the time, to follow the loop's revision prompt (a system
    message naming the broken principles): a model that follows principles when asked but not by
    default, as Constitutional AI assumes. Its context holds the revision prompts. And prompts."""
    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.posttrain.critique.loop import revision_prompt
    from scratchlm.posttrain.sft import sft
    from scratchlm.posttrain.tasks import make_problems
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.tokenizers.chat import add_chat_tokens

    root = tmp_path_factory.mktemp("critique")
    problems = make_problems("addition", 80, "train", 1)
    rng = random.Random(0)
    tok = CharTokenizer.train("0123456789+=\n abcdefghijklmnopqrstuvwxyz:", ["<|endoftext|>"])
    constitution = Constitution(parse_principles(PRINCIPLES))
    with open(root / "sft.jsonl", "w") as f:
        for p in problems * 4:
            user = [{"role": "user", "content": p.prompt}]
            reply = rng.choice(STYLES).format(a=p.answer)
            if (
                rng.random() < 0.25
            ):  # asked to revise (the loop's own revision prompt), it follows the principles
                critiques = constitution.evaluate([user], [reply])[0].critiques
                problems_named = [
                    (q, c) for q, c in zip(constitution.principles, critiques) if not c.satisfied
                ]
                user = revision_prompt(user, reply, problems_named, add_chat_tokens(tok))
                reply = f"answer {p.answer}"
            f.write(json.dumps({"messages": user + [{"role": "assistant", "content": reply}]}) + "\n")
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems)
    (root / "principles.json").write_text(json.dumps(PRINCIPLES))
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=4,
            d_model=64,
            block_size=256,
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
            dropout=0.0,
        )
    )
    save_model_only(root / "init", model, tokenizer=tok)
    sft(
        {"base": str(root / "init"), "data": str(root / "sft.jsonl"), "val_data": str(root / "sft.jsonl")},
        {
            "out_dir": str(root / "sft"),
            "max_steps": 150,
            "eval_interval": 150,
            "batch_size": 16,
            "lr": 3e-3,
            "sample_tokens": 0,
        },
        progress=False,
    )
    return root


def test_the_loop_through_the_cli_collects_better_revisions_and_trains_on_them(assistant, tmp_path, capsys):
    from scratchlm.cli import main
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint

    root, out = assistant, tmp_path / "cai"
    args = [
        "critique-revise",
        "--checkpoint",
        str(root / "sft" / "last"),
        "--prompts",
        str(root / "prompts.jsonl"),
        "--principles",
        str(root / "principles.json"),
        "--out",
        str(out),
        "--rounds",
        "2",
        "--candidates",
        "4",
        "--seed",
        "0",
        "--max-new-tokens",
        "16",
        "--held-out",
        "0.25",
        "--set",
        "train.max_steps=30",
        "--set",
        "train.lr=1e-3",
    ]
    assert main(args + ["--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results == json.loads((out / "results.json").read_text())
    assert results["format"] == "scratchlm.critique-revise" and len(results["compliance"]) == 3
    first, r1, r2 = results["compliance"][0], results["rounds"][0], results["rounds"][1]
    assert set(first["per_principle"]) == {"concise", "no_hedging", "format"} and first["n"] > 10
    assert r1["violating"] > 0 and r1["candidates"] == 4 * r1["violating"] and r1["collected"] > 0
    assert r1["revision_prompts_without_instructions"] == 0  # the principle and critique fit the context
    # Asked with the principles and critiques, the model follows them more often than unasked: a real revise step.
    assert r1["candidates_complying"] / r1["candidates"] > first["sampled_all"] + 0.2
    assert r2["start"] == r1["checkpoint"] and r1["checkpoint"].endswith("round-1/train/last")
    assert r1["train"]["steps"] == 30
    # Every collected revision beats its original by the principles, judged again by hand here.
    rows = [json.loads(line) for line in (out / "round-1" / "critiques.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "round-1" / "pairs.jsonl").read_text().splitlines()]
    sft_rows = [json.loads(line) for line in (out / "round-1" / "sft.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["better"]]
    assert len(kept) == len(sft_rows) == r1["revised"] and len(pairs) == r1["pairs"] > 0
    for row, conversation in zip(kept, sft_rows):
        assert conversation["messages"] == row["prompt"] + [{"role": "assistant", "content": row["revision"]}]
        assert row["revision"] in [c.strip() for c in row["candidates"]]
        assert oracle(row["revision"]) > oracle(row["original"], row["original_ended"])
    for pair in pairs:
        assert oracle(pair["chosen"]) > oracle(pair["rejected"])
    assert sum(oracle(p["chosen"])[0] for p in pairs) > sum(oracle(p["rejected"])[0] for p in pairs)
    # ... the model learned from them: held-out compliance rose, and the checkpoint is a chat model.
    assert results["compliance"][-1]["all"] > first["all"], [c["all"] for c in results["compliance"]]
    model, state = load_model_from_checkpoint(results["final_checkpoint"])
    assert "<|im_end|>" in load_checkpoint_tokenizer(results["final_checkpoint"], state).special_tokens
    # The folder is claimed: a second run asks for --resume or --overwrite; --resume with other settings is refused.
    assert main(args) == 2 and "--resume to continue it" in capsys.readouterr().err
    assert main(args + ["--resume", "--json"]) == 0  # every round done: nothing to redo
    assert json.loads(capsys.readouterr().out)["rounds"] == results["rounds"]
    assert main([a if a != "4" else "3" for a in args] + ["--resume"]) == 2
    assert "was made with other settings" in capsys.readouterr().err
    assert main([a if a != "2" else "3" for a in args] + ["--resume", "--json"]) == 0  # one more round
    more = json.loads(capsys.readouterr().out)
    assert (
        more["rounds"][:2] == results["rounds"] and more["rounds"][2]["start"] == results["final_checkpoint"]
    )
    assert len(more["compliance"]) == 4 and more["settings"]["rounds"] == 3


def test_the_model_as_critic_writes_the_critiques_and_dpo_trains_on_the_pairs(assistant, tmp_path):
    """The model critic's words are the critique (its greedy reply to the critique request); a
    reply passes when they start with the pass word. This tiny model answers every request like an
    addition ("answer 10"): it cannot judge anything, but the path runs end to end."""
    from scratchlm.posttrain.critique.critics import critique_request
    from scratchlm.serve.chat import generate_replies, load_chat_model

    root = assistant
    model, tok = load_chat_model(root / "sft" / "last")

    def critic_says(critic, principle: str, replies: list[str], prompts=None) -> list[str]:
        prompts = prompts or [[{"role": "user", "content": "1+2="}]] * len(replies)
        asked = [
            critique_request(
                parse_principles([{"name": "p", "text": principle, "check": {"kind": "model"}}])[0],
                prompt,
                r,
                tok,
            )
            for prompt, r in zip(prompts, replies)
        ]
        return [g["text"].strip() for g in generate_replies(critic, tok, asked, 12)]

    # Critiques and verdicts, from the model itself and from another checkpoint (the random init).
    principles = parse_principles(
        [
            {
                "name": "kind",
                "text": "be kind",
                "check": {"kind": "model", "pass": "maybe", "max_tokens": 12},
            },
            {
                "name": "brief",
                "text": "be brief",
                "check": {"kind": "model", "checkpoint": str(root / "init"), "max_tokens": 12},
            },
        ]
    )
    replies = ["answer 3", "maybe 4", "the answer is 5", "x"]
    evals = Constitution(principles, model=model, tokenizer=tok).evaluate(
        [[{"role": "user", "content": "1+2="}]] * 4, replies
    )
    said = critic_says(model, "be kind", replies)
    first = [re.search(r"\w+", t).group() if re.search(r"\w+", t) else "" for t in said]
    assert [e.critiques[0] for e in evals] == [
        Critique(w == "maybe", float(w == "maybe"), "" if w == "maybe" else t) for w, t in zip(first, said)
    ]
    init, _ = load_chat_model(root / "init")
    said = critic_says(init, "be brief", replies)  # a random model: noise, and never "yes"
    assert [e.critiques[1].text for e in evals] == said and not any(e.critiques[1].satisfied for e in evals)
    # The loop with a model-judged principle beside a programmatic one, trained by DPO.
    principles = PRINCIPLES[2:] + [
        {"name": "judge", "text": "be kind", "check": {"kind": "model", "pass": "answer", "max_tokens": 12}}
    ]
    results = critique_revise(
        root / "sft" / "last",
        root / "prompts.jsonl",
        principles,
        tmp_path / "judge",
        rounds=1,
        samples=2,
        max_tokens=16,
        method="dpo",
        progress=False,
        train_config={"max_steps": 5, "lr": 1e-4},
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "judge" / "round-1" / "critiques.jsonl").read_text().splitlines()
    ]
    said = critic_says(model, "be kind", [r["original"] for r in rows], [r["prompt"] for r in rows])
    assert [r["critiques"]["judge"]["satisfied"] for r in rows] == [
        (re.findall(r"\w+", t) or [""])[0] == "answer" for t in said
    ]
    assert "judge" in results["compliance"][0]["per_principle"]
    r1 = results["rounds"][0]
    assert (
        r1["pairs"] > 0
        and r1["train"]["steps"] == 5
        and results["final_checkpoint"].endswith("round-1/train/last")
    )
    state = json.loads((tmp_path / "judge" / "round-1" / "train" / "last" / "state.json").read_text())
    assert state["method"] == "dpo"


# --- review fixes: resuming, validation before claiming, special tokens, critics ----------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny chat model (no training: fast) with a few prompts, for the loop's plumbing."""
    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.tokenizers import CharTokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = CharTokenizer.train("0123456789+=\n abcdefghijklmnopqrstuvwxyz:", ["<|endoftext|>"])
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size,
            n_layer=1,
            n_head=2,
            d_model=16,
            block_size=192,
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
            dropout=0.0,
        )
    )
    save_model_only(root / "init", model, tokenizer=tok)
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{a}+{b}="}) + "\n" for a in range(3) for b in range(2))
    )
    (root / "eval.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    return root


def _run(tiny, out, **kw):
    args = dict(
        rounds=1,
        samples=1,
        max_tokens=4,
        progress=False,
        eval_prompts=tiny / "eval.jsonl",
        train_config={"max_steps": 1},
        log=lambda m: None,
    )
    return critique_revise(tiny / "init", tiny / "prompts.jsonl", PRINCIPLES, out, **{**args, **kw})


def _fake_round(revised=0, pairs=0, fail=False):
    def one_round(model, tok, constitution, items, s, number, folder, progress, log):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "partial.jsonl").write_text("")
        if fail:
            raise RuntimeError("interrupted")
        return {
            "counts": {
                "originals": len(items),
                "violating": len(items),
                "candidates": 0,
                "candidates_ended": 0,
                "candidates_complying": 0,
                "revised": revised,
                "pairs": pairs,
                "collected": 0,
                "revision_prompts_without_instructions": 0,
            }
        }

    return one_round


def test_a_run_interrupted_in_round_1_resumes(tiny, tmp_path, monkeypatch):
    import scratchlm.posttrain.critique.loop as critique

    out = tmp_path / "run"
    monkeypatch.setattr(critique, "_one_round", _fake_round(fail=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(tiny, out)
    saved = json.loads((out / "results.json").read_text())  # written right after the starting measurement
    assert (
        saved["rounds"] == []
        and len(saved["compliance"]) == 1
        and (out / "round-1" / "partial.jsonl").exists()
    )
    with pytest.raises(FileExistsError, match="--resume to continue it"):
        _run(tiny, out)
    monkeypatch.setattr(critique, "_one_round", _fake_round())
    results = _run(tiny, out, resume=True)
    assert len(results["rounds"]) == 1 and results["compliance"][0] == saved["compliance"][0]
    # Round folders without results.json (stopped before the starting measurement): leftovers, started afresh.
    (out / "results.json").unlink()
    assert len(_run(tiny, out, resume=True)["rounds"]) == 1


def test_an_early_stop_stays_stopped_and_the_dpo_message_says_why(tiny, tmp_path, monkeypatch):
    import scratchlm.posttrain.critique.loop as critique

    said = []
    monkeypatch.setattr(critique, "_one_round", _fake_round(revised=3, pairs=0))
    results = _run(tiny, tmp_path / "run", method="dpo", log=said.append)
    assert results["stop_reason"] == "round 1 collected nothing"
    assert any(
        "3 revisions were better than their originals, but none made a preference pair" in m for m in said
    )
    again = _run(tiny, tmp_path / "run", method="dpo", rounds=3, resume=True)
    assert again["stop_reason"] == "round 1 collected nothing" and len(again["rounds"]) == 1


def _zero(prompt, reply):
    return 0.0


def _one(prompt, reply):
    return 1.0


def test_resume_identity_covers_scorers_and_prompt_contents_but_not_the_device(tiny, tmp_path, monkeypatch):
    import scratchlm.posttrain.critique.loop as critique

    monkeypatch.setattr(critique, "_one_round", _fake_round(revised=0))
    principles = PRINCIPLES + [{"name": "s", "text": "t", "check": {"kind": "scorer", "name": "len"}}]
    out = tmp_path / "run"
    results = critique_revise(
        tiny / "init",
        tiny / "prompts.jsonl",
        principles,
        out,
        rounds=2,
        samples=1,
        max_tokens=4,
        progress=False,
        eval_prompts=tiny / "eval.jsonl",
        scorers={"len": _zero},
        train_config={"device": "cpu"},
        log=lambda m: None,
    )
    assert results["scorers"]["len"].endswith(":_zero") and len(results["prompts_sha256"]) == 64

    def again(**kw):
        args = dict(
            rounds=2,
            samples=1,
            max_tokens=4,
            progress=False,
            eval_prompts=tiny / "eval.jsonl",
            scorers={"len": _zero},
            train_config={},
            log=lambda m: None,
            resume=True,
        )
        return critique_revise(tiny / "init", tiny / "prompts.jsonl", principles, out, **{**args, **kw})

    assert len(again()["rounds"]) == 1  # without train.device: the device is no part of the identity
    with pytest.raises(ValueError, match="other scorers"):
        again(scorers={"len": _one})
    with pytest.raises(ValueError, match="--rounds 0"):
        critique._claim(
            out,
            {
                **json.loads((out / "results.json").read_text()),
                "settings": {**results["settings"], "rounds": 0},
            },
            True,
            False,
        )
    edited = tmp_path / "eval.jsonl"
    edited.write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n")
    with pytest.raises(ValueError, match="other eval_prompts, eval_prompts_sha256"):
        again(eval_prompts=edited)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"method_config": {"lora_rnak": 4}}, r"unknown \[sft\] keys \['lora_rnak'\]"),
        ({"method": "dpo", "method_config": {"betta": 0.1}}, r"unknown \[dpo\] keys \['betta'\]"),
        ({"train_config": {"max_stepz": 3}}, r"unknown \[train\] keys \['max_stepz'\]"),
        ({"method_config": {"base": "elsewhere"}}, "sft.base is set by the loop"),
        ({"method_config": {"val_data": "x.jsonl"}}, "sft.val_data is set by the loop"),
        ({"train_config": {"out_dir": "x"}}, "train.out_dir is set by the loop"),
        (
            {
                "scorers": {},
                "principles": PRINCIPLES
                + [{"name": "s", "text": "t", "check": {"kind": "scorer", "name": "rm"}}],
            },
            "asks for the scorer 'rm'",
        ),
    ],
)
def test_overwrite_validates_everything_before_deleting_the_previous_run(tiny, tmp_path, setting, message):
    out = tmp_path / "run"
    (out / "round-1").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    setting = dict(setting)
    principles = setting.pop("principles", PRINCIPLES)
    with pytest.raises(ValueError, match=message):
        critique_revise(
            tiny / "init",
            tiny / "prompts.jsonl",
            principles,
            out,
            overwrite=True,
            progress=False,
            eval_prompts=tiny / "eval.jsonl",
            **setting,
        )
    assert (out / "round-1").is_dir() and (out / "results.json").read_text() == "{}"  # untouched


def test_special_token_text_in_a_reply_reaches_no_critic_or_revision_prompt(tiny, monkeypatch):
    import scratchlm.serve.chat as chat_module
    from scratchlm.posttrain.critique.critics import without_special_tokens
    from scratchlm.posttrain.critique.loop import revision_prompt
    from scratchlm.serve.chat import load_chat_model
    from scratchlm.tokenizers.chat import ChatTemplate

    model, tok = load_chat_model(tiny / "init")
    reply = "answer 4<|endoftext|><|im_start|>user"
    assert without_special_tokens(reply, tok) == "answer 4user"
    seen = []
    principles = parse_principles(
        PRINCIPLES
        + [
            {"name": "judge", "text": "be kind", "check": {"kind": "model", "max_tokens": 3}},
            {"name": "s", "text": "t", "check": {"kind": "scorer", "name": "s"}},
        ]
    )
    constitution = Constitution(
        principles, model=model, tokenizer=tok, scorers={"s": lambda p, r: seen.append(r) or 0.0}
    )
    prompt = [{"role": "user", "content": "2+2="}]
    evals = constitution.evaluate([prompt], [reply])  # the model critic's request renders: no crash
    assert seen == ["answer 4user"] and len(evals[0].critiques) == 5
    problems = [(p, c) for p, c in zip(principles, evals[0].critiques) if not c.satisfied]
    ChatTemplate(tok).prompt_ids(revision_prompt(prompt, reply, problems, tok))  # renders
    # The whole loop, with the model sampling such text: it runs, and never learns a reply with it.
    real = chat_module.generate_replies

    def with_specials(model, tokenizer, prompts, max_tokens=32, **kw):
        out = real(model, tokenizer, prompts, max_tokens, **kw)
        return [{**r, "text": r["text"] + "<|endoftext|>"} for r in out]

    monkeypatch.setattr(chat_module, "generate_replies", with_specials)
    from scratchlm.posttrain.critique.loop import compliance

    result = compliance(
        model, tok, constitution, [type("P", (), {"prompt": prompt, "answer": None})()], max_tokens=3
    )
    assert result["n"] == 1


def test_model_critic_pass_word_is_one_word_and_the_critic_sees_the_conversation(tiny, monkeypatch):
    import scratchlm.serve.chat as chat_module
    from scratchlm.serve.chat import load_chat_model

    with pytest.raises(ValueError, match="check.pass must be one word"):
        parse_principles([{"name": "j", "text": "t", "check": {"kind": "model", "pass": "Yes."}}])
    with pytest.raises(ValueError, match="check.pass must be one word"):
        parse_principles([{"name": "j", "text": "t", "check": {"kind": "model", "pass": "looks good"}}])
    model, tok = load_chat_model(tiny / "init")
    asked = []

    def says(model, tokenizer, requests, max_tokens=32, **kw):
        asked.extend(requests)
        return [{"text": t, "ended": True} for t in [", Yes it does", "yesterday", "no.", ""]]

    monkeypatch.setattr(chat_module, "generate_replies", says)
    principles = parse_principles([{"name": "j", "text": "never say maybe", "check": {"kind": "model"}}])
    evals = Constitution(principles, model=model, tokenizer=tok).evaluate(
        [[{"role": "user", "content": f"{i}+1="}] for i in range(4)], ["a", "b", "c", "d"]
    )
    assert [e.critiques[0].satisfied for e in evals] == [True, False, False, False]
    text = asked[0][0]["content"]
    assert "0+1=" in text and text.index("reply: a") < text.index(
        "never say maybe"
    )  # the principle comes last


def test_scorers_must_return_finite_numbers():
    principles = parse_principles([{"name": "p", "text": "t", "check": {"kind": "scorer", "name": "bad"}}])
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="the scorer 'bad' .*returned"):
            Constitution(principles, scorers={"bad": lambda p, r, v=value: v}).evaluate(
                [[{"role": "user", "content": "q"}]], ["r"]
            )


def test_a_byte_level_model_sampling_special_token_text_does_not_crash_the_loop(tmp_path, monkeypatch):
    """Byte-level and BPE tokenizers spell '<|endoftext|>' as ordinary bytes, and generation ignores
    end of text: such replies must reach neither the revision prompt, the model critic nor a scorer."""
    import scratchlm.serve.chat as chat_module
    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size,
            n_layer=1,
            n_head=2,
            d_model=16,
            block_size=512,
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
            dropout=0.0,
        )
    )
    save_model_only(tmp_path / "init", model, tokenizer=tok)
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{a}+1="}) + "\n" for a in range(3))
    )
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    real, seen = chat_module.generate_replies, []

    def with_specials(model, tokenizer, prompts, max_tokens=32, **kw):
        return [
            {**r, "text": "maybe <|endoftext|>" + r["text"] + "<|im_start|>"}
            for r in real(model, tokenizer, prompts, max_tokens, **kw)
        ]

    monkeypatch.setattr(chat_module, "generate_replies", with_specials)
    principles = PRINCIPLES + [
        {"name": "judge", "text": "be kind", "check": {"kind": "model", "max_tokens": 2}},
        {"name": "s", "text": "t", "check": {"kind": "scorer", "name": "s"}},
    ]
    results = critique_revise(
        tmp_path / "init",
        tmp_path / "prompts.jsonl",
        principles,
        tmp_path / "run",
        rounds=1,
        samples=1,
        max_tokens=3,
        progress=False,
        eval_prompts=tmp_path / "eval.jsonl",
        scorers={"s": lambda p, r: seen.append(r) or 0.0},
        log=lambda m: None,
    )
    assert len(results["rounds"]) == 1 and results["rounds"][0]["violating"] == 3
    assert seen and not any("<|" in r for r in seen)
    assert results["rounds"][0]["revised"] == 0  # a candidate with such text is never learned


def test_forbidden_phrases_and_symbols_match_across_spacing_case_and_unicode_forms():
    check = {
        "kind": "forbidden_words",
        "words": ["i think", "c++", ".net", "STRASSE", "café"],
        "case_sensitive": False,
    }
    assert not check_reply({**check, "words": ["i think"]}, "well I\n  think so").satisfied  # any whitespace
    assert not check_reply({**check, "words": ["c++"]}, "use c++.").satisfied
    assert not check_reply(
        {**check, "words": [".net"]}, "in.net"
    ).satisfied  # no boundary before a non-word char
    assert check_reply({**check, "words": [".net"]}, "a .network").satisfied  # ... but after its last letter
    assert not check_reply({**check, "words": ["STRASSE"]}, "die straße").satisfied  # casefold
    assert not check_reply({**check, "words": ["café"]}, "un cafe\u0301").satisfied  # NFC


def test_the_cli_refuses_reserved_set_keys_and_takes_epochs(tiny, tmp_path, capsys, monkeypatch):
    import scratchlm.posttrain.critique.loop as critique
    from scratchlm.cli import main

    args = [
        "critique-revise",
        "--checkpoint",
        str(tiny / "init"),
        "--prompts",
        str(tiny / "prompts.jsonl"),
        "--principles",
        str(tmp_path / "p.json"),
        "--eval-prompts",
        str(tiny / "eval.jsonl"),
        "--out",
        str(tmp_path / "run"),
        "--max-new-tokens",
        "4",
    ]
    (tmp_path / "p.json").write_text(json.dumps(PRINCIPLES))
    assert main(args + ["--set", "sft.data=mine.jsonl"]) == 2
    assert "sft.data is set by the loop" in capsys.readouterr().err and not (tmp_path / "run").exists()
    monkeypatch.setattr(critique, "_one_round", _fake_round())
    assert main(args + ["--epochs", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["epochs"] == 0.5


def test_a_reward_model_scorer_is_batched_and_known_by_its_weights(tiny, tmp_path):
    from scratchlm.posttrain.critique.critics import RewardScorer, scorer_identity
    from scratchlm.posttrain.reward import load_reward_model, train_reward_model

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "chosen": "answer 1", "rejected": "maybe"}) + "\n"
            for i in range(8)
        )
    )
    train_reward_model(
        {"base": str(tiny / "init"), "data": str(pairs), "val_data": str(pairs)},
        {"out_dir": str(tmp_path / "rm"), "max_steps": 2, "eval_interval": 2, "sample_tokens": 0},
        progress=False,
    )
    scorer = RewardScorer(tmp_path / "rm" / "last", "cpu")
    state = json.loads((tmp_path / "rm" / "last" / "state.json").read_text())
    assert scorer_identity(scorer) == {
        "reward_model": str((tmp_path / "rm" / "last").resolve()),
        "model_sha256": state["files"]["model.safetensors"]["sha256"],
    }
    prompts, replies = [[{"role": "user", "content": "1+1="}]] * 3, ["answer 2", "maybe", "2"]
    reference = load_reward_model(tmp_path / "rm" / "last")
    batched = scorer.batch(prompts, replies)
    assert batched == pytest.approx([reference.score_one(p, r) for p, r in zip(prompts, replies)], abs=1e-5)
    principles = parse_principles(
        [{"name": "rm", "text": "t", "check": {"kind": "scorer", "name": "reward_model"}}]
    )
    evals = Constitution(principles, scorers={"reward_model": scorer}).evaluate(prompts, replies)
    assert [e.critiques[0].score for e in evals] == pytest.approx(batched, abs=1e-6)


def test_the_starting_model_is_kept_as_critic_only_when_a_principle_asks_it(tiny, tmp_path, monkeypatch):
    import scratchlm.posttrain.critique.loop as critique

    given = []

    class Recording(critique.Constitution):
        def __init__(self, principles, **kw):
            given.append(kw["model"])
            super().__init__(principles, **kw)

    monkeypatch.setattr(critique, "Constitution", Recording)
    monkeypatch.setattr(critique, "_one_round", _fake_round())
    _run(tiny, tmp_path / "a")
    critique_revise(
        tiny / "init",
        tiny / "prompts.jsonl",
        PRINCIPLES + [{"name": "j", "text": "t", "check": {"kind": "model", "max_tokens": 2}}],
        tmp_path / "b",
        rounds=1,
        samples=1,
        max_tokens=4,
        progress=False,
        eval_prompts=tiny / "eval.jsonl",
        log=lambda m: None,
    )
    assert given[0] is None and given[1] is not None
