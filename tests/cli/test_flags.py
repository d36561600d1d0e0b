"""The shared flag vocabulary: one meaning per flag name on every command, old spellings still accepted."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from scratchlm.cli import GROUPS, build_parser, commands, flags, main


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """``"data prepare"`` -> its parser, for every command."""
    found = {}

    def walk(parser, path):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[" ".join(path)] = parser
        for sub in subs:
            for name, child in sub.choices.items():
                walk(child, [*path, name])

    walk(build_parser(), [])
    return found


def test_every_command_is_listed_once_in_a_group():
    listed = [" ".join(c.path) for c in commands()]
    assert len(listed) == len(set(listed)) == 25
    assert set(listed) == set(command_parsers())
    out = subprocess.run(
        [sys.executable, "-m", "scratchlm", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for group in GROUPS:
        assert f"  {group} " in out


@pytest.mark.parametrize("name", sorted(command_parsers()))
def test_shared_names_come_from_flags_py(name):
    parser = command_parsers()[name]
    for action in parser._actions:
        for option in action.option_strings:
            if option in flags.HELP and option not in getattr(action, "deprecated", ()):
                assert getattr(action, "shared", None) == option, f"{name}: {option} is spelled by hand"
                assert action.help.startswith(flags.HELP[option]), f"{name}: {option} has its own help"
        if getattr(action, "shared", None) == "--seed":
            assert action.default == flags.SEED
    parser.format_help()  # every help text expands (registries included)


def test_model_running_commands_take_device():
    parsers = command_parsers()
    running = {" ".join(c.path) for c in commands() if c.runs_model}
    assert running == {
        "bigram",
        "train",
        "eval",
        "sample",
        "generate",
        "sft",
        "dpo",
        "reward-model",
        "ppo",
        "grpo",
        "critique-revise",
    }
    for name, parser in parsers.items():
        options = {o for a in parser._actions for o in a.option_strings}
        assert ("--device" in options) == (name in running), name
        # a command that loads a checkpoint either runs it (and takes --device) or only rewrites files
        if "--checkpoint" in options and name not in running:
            assert name in {"model export", "lora merge"}, name


def test_choices_come_from_the_registries():
    from scratchlm.models.hf import EXPORT_FAMILIES
    from scratchlm.models.presets import PRESETS
    from scratchlm.posttrain.tasks import TASKS

    parsers = command_parsers()
    export_help = parsers["model export"].format_help()
    assert all(arch in export_help for arch in EXPORT_FAMILIES) and len(EXPORT_FAMILIES) > 2
    assert all(name in parsers["model info"].format_help() for name in PRESETS)
    assert all(name in parsers["tasks"].format_help() for name in TASKS)


def test_old_spellings_still_work_and_warn(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["tokenizer", "encode", "--tokenizer", "gpt2", "--file", str(text), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ids"] == [31373]
    assert captured.err.strip() == "scratchlm: warning: --file is deprecated; use --text-file"
    assert main(["tokenizer", "encode", "--tokenizer", "gpt2", "--text-file", str(text), "--json"]) == 0
    assert capsys.readouterr().err == ""
    args = build_parser().parse_args(
        [
            "generate",
            "--checkpoint",
            "c",
            "--input",
            "p.jsonl",
            "--output",
            "o.jsonl",
            "--block-size",
            "8",
            "--num-blocks",
            "4",
        ]
    )
    assert (args.prompts, args.out, args.kv_block_size, args.kv_blocks) == ("p.jsonl", "o.jsonl", 8, 4)
    err = capsys.readouterr().err
    for old, new in [
        ("--input", "--prompts"),
        ("--output", "--out"),
        ("--block-size", "--kv-block-size"),
        ("--num-blocks", "--kv-blocks"),
    ]:
        assert f"{old} is deprecated; use {new}" in err
    help_text = command_parsers()["generate"].format_help()
    assert "--block-size" not in help_text.replace("--kv-block-size", "") and "--output" not in help_text


@pytest.mark.parametrize("name", sorted(command_parsers()))
def test_help_shows_every_default_and_no_none(name):
    """One formatter for every command: a flag with a default says it in --help; a flag without one
    prints no "(default: None)" noise (its help may say in words what leaving it out means)."""
    parser = command_parsers()[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        text = formatter._expand_help(action) if action.help else formatter._get_help_string(action)
        if action.default not in (None, False, [], argparse.SUPPRESS) and not action.required:
            assert "default" in text, (name, action.option_strings, text)
    assert "None" not in parser.format_help(), name


def test_sample_and_generate_share_their_defaults():
    parsers = command_parsers()
    for name in ("sample", "generate"):
        args = parsers[name].parse_args(
            ["--checkpoint", "c", "--prompts", "p", "--out", "o"][: 2 if name == "sample" else 6]
        )
        assert (
            (args.max_new_tokens, args.temperature) == (flags.MAX_NEW_TOKENS, flags.TEMPERATURE) == (300, 0.8)
        )
        help_text = " ".join(parsers[name].format_help().split())
        assert "(default 300)" in help_text and "(default 0.8)" in help_text
