"""Post-training data: loaders for the common JSONL shapes with errors that name
file and line, and synthetic tasks with exact checkers and held-out splits that cannot leak."""

from __future__ import annotations

import json
import random

import pytest

from scratchlm.posttrain.data import load_pairs, load_prompts, load_sft, write_task_data
from scratchlm.posttrain.tasks import TASKS, check, make_problems, split_of, wrong_answer


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_sft_loader_reads_chat_alpaca_and_prompt_completion(tmp_path):
    path = write_lines(
        tmp_path / "sft.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            {"instruction": "Add.", "input": "2+2", "output": "4"},
            {"instruction": "Say hi.", "output": "hi"},
            {"prompt": "1+1=", "completion": "2"},
        ],
    )
    items = load_sft(path).items
    assert items[1] == [{"role": "user", "content": "Add.\n\n2+2"}, {"role": "assistant", "content": "4"}]
    assert items[2][0]["content"] == "Say hi." and items[3][-1] == {"role": "assistant", "content": "2"}
    assert len(items) == 4


@pytest.mark.parametrize(
    "loader,line,message",
    [
        (load_sft, "{not json", "line 2"),
        (load_sft, {"messages": [{"role": "user", "content": "no answer"}]}, "no assistant message"),
        (load_sft, {"text": "raw"}, "Alpaca"),
        (load_sft, {"messages": [{"role": "robot", "content": "x"}]}, "role must be"),
        (load_pairs, {"prompt": "p", "chosen": "c"}, r"missing \['rejected'\]"),
        (load_pairs, {"prompt": "p", "chosen": 1, "rejected": "r"}, "'chosen' must be a string"),
        (load_prompts, {"prompt": "p"}, "answer"),
        (load_prompts, ["a", "list"], "JSON object"),
    ],
)
def test_a_bad_record_names_file_and_line_or_is_skipped_and_counted(tmp_path, loader, line, message):
    good = {
        "load_sft": {"prompt": "x", "completion": "y"},
        "load_pairs": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "load_prompts": {"prompt": "p", "answer": "a"},
    }[loader.__name__]
    path = write_lines(tmp_path / "data.jsonl", [good, line, good])
    with pytest.raises(ValueError, match=message) as info:
        loader(path)
    assert "data.jsonl, line 2" in str(info.value) and "--skip-invalid" in str(info.value)
    loaded = loader(path, skip_invalid=True)
    assert len(loaded.items) == 2 and loaded.skipped == 1 and "line 2" in loaded.errors[0]


def test_every_task_checks_its_own_answer_and_rejects_its_wrong_one():
    rng = random.Random(0)
    for task in TASKS:
        for difficulty in (1, 2, 3):
            for p in make_problems(task, 50, "train", difficulty):
                assert check(p.answer, f" {p.answer}\n")
                wrong = wrong_answer(p, rng)
                assert wrong != p.answer and not check(p.answer, wrong), (p, wrong)
    assert make_problems("addition", 3, "test", 2)[0].prompt.endswith("=")
    p = make_problems("addition", 1, "train", 3)[0]
    a, b = p.prompt[:-1].split("+")
    assert int(p.answer) == int(a) + int(b)


def test_held_out_problems_never_appear_in_training_data_of_any_seed_or_size():
    test = {p.prompt for p in make_problems("addition", 500, "test", 2, seed=0)}
    for seed in (0, 1, 2):
        train = {p.prompt for p in make_problems("addition", 3000, "train", 2, seed=seed)}
        assert not train & test
    assert all(split_of("addition", prompt) == "test" for prompt in test)
    with pytest.raises(ValueError, match="distinct"):
        make_problems("addition", 200, "test", 1)  # 1-digit sums: only ~10 of the 100 are held out


def test_task_data_folder_via_the_cli(tmp_path, capsys):
    from scratchlm.cli import main

    out = tmp_path / "tasks"
    assert (
        main(
            [
                "tasks",
                "--tasks",
                "addition,reverse",
                "--train",
                "50",
                "--test",
                "10",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    manifest = json.loads(capsys.readouterr().out)
    assert (
        manifest["files"]["sft-train.jsonl"]["records"] == 100
        and manifest["files"]["prompts-test.jsonl"]["records"] == 20
    )
    sft = load_sft(out / "sft-train.jsonl").items
    pairs = load_pairs(out / "pairs-test.jsonl").items
    prompts = load_prompts(out / "prompts-test.jsonl").items
    assert all(m[-1]["role"] == "assistant" for m in sft)
    assert all(p.chosen != p.rejected for p in pairs)
    assert all(p.reward(p.answer) == 1.0 and p.reward(p.answer + "0") == 0.0 for p in prompts)
    corpus = (out / "corpus-train.txt").read_text().splitlines()
    assert len(corpus) == 100 and all(
        line.split("=")[0] + "=" in {m[0]["content"] for m in sft} for line in corpus if "+" in line
    )
    again = write_task_data(
        tmp_path / "again", ["addition", "reverse"], train=50, test=10, seed=1337
    )  # the CLI's seed
    assert again["files"] == manifest["files"]


@pytest.mark.parametrize(
    "record,message",
    [
        ({"instruction": "Sum", "input": ["1", "2"], "output": "3"}, "'input' must be a string"),
        ({"instruction": None, "output": "3"}, "'instruction' must be a string"),
        ({"instruction": "Sum", "input": 0, "output": "3"}, "'input' must be a string"),
    ],
)
def test_alpaca_fields_are_type_checked(tmp_path, record, message):
    path = write_lines(tmp_path / "a.jsonl", [record])
    with pytest.raises(ValueError, match=message):
        load_sft(path)


def test_a_conversation_the_template_refuses_names_its_line(tmp_path):
    from scratchlm.posttrain.sft import render_all
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.tokenizers.chat import ChatTemplate, add_chat_tokens

    path = write_lines(
        tmp_path / "s.jsonl",
        [{"prompt": "hi", "completion": "ok"}, {"prompt": "hi", "completion": "<|endoftext|> sneaky"}],
    )
    t = ChatTemplate(add_chat_tokens(CharTokenizer.train("abcdefghijklmnopqrstuvwxyz \n", ["<|endoftext|>"])))
    with pytest.raises(ValueError, match=r"s.jsonl, line 2: .*special token"):
        render_all(load_sft(path).items, t, 64)
    rows, _ = render_all(load_sft(path).items, t, 64, skip_invalid=True)
    assert len(rows) == 1


def test_a_swapped_addition_lands_in_the_same_split():
    for p in make_problems("addition", 300, "test", 2):
        a, b = p.prompt[:-1].split("+")
        assert split_of("addition", f"{b}+{a}=") == "test"
