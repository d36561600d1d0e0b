"""Config and command-line input: every value is checked (type and range) with a message that names
the key, the value and what is allowed; flags mean the same thing in every command."""

from __future__ import annotations

import json
import typing
from dataclasses import fields, is_dataclass

import pytest

from scratchlm.cli import main
from scratchlm.cli.infer import interpret_escapes
from scratchlm.config import ConfigError, apply_overrides, load_config
from scratchlm.models.config import GPTConfig
from scratchlm.train.config import TrainConfig

# A value of the wrong type for each annotation.
WRONG_TYPE = {int: "many", float: "fast", str: 12.5j, bool: "yes"}


def _base_type(cls, name):
    annotation = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0]


def _out_of_range(cls, name):
    """A value of the right type that the field's rule refuses (None if the field has no rule)."""
    import scratchlm.models.config as model_config
    import scratchlm.train.config as train_config

    rules = train_config._TRAIN_RULES if cls is TrainConfig else model_config._MODEL_RULES
    rule = rules.get(name)
    if rule is None:
        return None
    if rule.choices is not None:
        return "no-such-choice"
    if rule.min is not None:
        return type(getattr(cls(), name) or rule.min)(rule.min - 1)
    if rule.above is not None:
        return type(rule.above)(rule.above) if _base_type(cls, name) is float else int(rule.above)
    return None


@pytest.mark.parametrize("cls,section", [(TrainConfig, "train"), (GPTConfig, "model")])
def test_every_field_refuses_a_wrong_type_naming_the_key(cls, section):
    for f in fields(cls):
        base = _base_type(cls, f.name)
        # a list of names given one bare name; a block kind's table given a number
        value = (
            "attention" if typing.get_origin(base) is list else 3 if is_dataclass(base) else WRONG_TYPE[base]
        )
        with pytest.raises(ConfigError, match=rf"^{section}\.{f.name} = .*expected"):
            cls(**{f.name: value})


@pytest.mark.parametrize("cls,section", [(TrainConfig, "train"), (GPTConfig, "model")])
def test_every_ranged_field_refuses_an_out_of_range_value(cls, section):
    checked = 0
    for f in fields(cls):
        value = _out_of_range(cls, f.name)
        if value is None:
            continue
        with pytest.raises(ConfigError, match=rf"^{section}\.{f.name} = .*must be"):
            cls(**{f.name: value})
        checked += 1
    assert checked >= (20 if cls is TrainConfig else 14)


def test_numbers_are_coerced_only_where_safe():
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    assert TrainConfig(out_dir=2024).out_dir == "2024"
    with pytest.raises(ConfigError, match=r"train.batch_size = True: expected an integer, found bool"):
        TrainConfig(batch_size=True)
    with pytest.raises(ConfigError, match=r"train.eval_interval = 0: must be >= 1"):
        TrainConfig(eval_interval=0)
    with pytest.raises(ConfigError, match=r"model.dropout = 1.0: must be >= 0 and < 1"):
        GPTConfig(dropout=1.0)


def test_set_keeps_a_date_like_value_as_text_and_a_toml_date_is_refused(tmp_path):
    config = apply_overrides({}, ["train.out_dir=2024-06-01", "train.lr=3e-4", "model.position=rope"])
    assert config == {"train": {"out_dir": "2024-06-01", "lr": 3e-4}, "model": {"position": "rope"}}
    assert TrainConfig.from_dict(config["train"]).out_dir == "2024-06-01"
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nout_dir = 2024-06-01\n")
    with pytest.raises(
        ConfigError, match=r"train.out_dir = .*expected a string, found date \(TOML read it as a date"
    ):
        TrainConfig.from_dict(load_config(toml)["train"])


def test_cli_train_with_a_bad_value_exits_2_naming_the_key(tmp_path, capsys):
    assert main(["train", "--set", f"train.data={tmp_path}", "--set", "train.eval_interval=0"]) == 2
    assert "train.eval_interval = 0: must be >= 1" in capsys.readouterr().err


def test_model_info_applies_set_to_a_preset(capsys):
    assert main(["model", "info", "--preset", "gpt2", "--set", "model.n_layer=2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["n_layer"] == 2 and info["config"]["d_model"] == 768
    assert main(["model", "info", "--preset", "gpt2", "--set", "model.n_layer=0"]) == 2
    assert "model.n_layer = 0: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "typed,meant",
    [
        ("café\\n", "café\n"),
        ("日本語\\tok", "日本語\tok"),
        ("emoji 🙂\\\\n", "emoji 🙂\\n"),
        ("\\u00e9t\\u00e9", "été"),
    ],
)
def test_escapes_keep_non_ascii_text(typed, meant):
    assert interpret_escapes(typed) == meant


def test_unknown_names_exit_2_with_the_choices(capsys):
    assert main(["model", "info", "--preset", "gpt5"]) == 2
    assert "unknown preset 'gpt5'; presets:" in capsys.readouterr().err


def test_flags_are_named_alike_across_commands():
    from scratchlm.cli import build_parser

    parser = build_parser()
    options = {}

    def walk(p, path):
        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            for opt in action.option_strings:
                options.setdefault(opt, []).append(" ".join(path))

    walk(parser, [])
    for old in ("--samples", "--max-tokens", "--split"):
        assert old not in options, f"{old} is still used by {options[old]}"
    assert {"bigram", "sample"} <= set(options["--num-samples"]) and {"bigram", "sample"} <= set(
        options["--max-new-tokens"]
    )


def test_an_incomplete_escape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"--escapes: .* has an incomplete escape"):
        interpret_escapes("price \\x")


@pytest.mark.parametrize("cls", [TrainConfig, GPTConfig])
def test_every_bound_is_where_its_rule_says(cls):
    """Each inclusive bound is allowed and the next value past it refused; exclusive bounds refuse the bound."""
    import scratchlm.models.config as model_config
    import scratchlm.train.config as train_config

    rules = train_config._TRAIN_RULES if cls is TrainConfig else model_config._MODEL_RULES
    base = (
        {"d_model": 8, "n_head": 1}
        if cls is GPTConfig
        else {"lr": 1.0, "min_lr": 0.0, "max_steps": 10**6, "warmup_steps": 0}
    )
    checked = 0
    for name, rule in rules.items():
        is_float = _base_type(cls, name) is float
        step = 1e-9 if is_float else 1
        cases = []
        for bound, allowed_at, direction in (
            (rule.min, True, -1),
            (rule.max, True, +1),
            (rule.above, False, -1),
            (rule.below, False, +1),
        ):
            if bound is None:
                continue
            at = float(bound) if is_float else int(bound)
            cases.append((at, allowed_at))
            cases.append((at + direction * step, False) if allowed_at else (at - direction * step, True))
        for value, allowed in cases:
            kwargs = {**base, name: value}
            if name == "min_lr":
                kwargs["lr"] = max(value, 1.0)
            if name == "warmup_steps":
                kwargs["max_steps"] = 10**6
            if allowed:
                cls(**kwargs)
            else:
                with pytest.raises(ConfigError, match=rf"{name}"):
                    cls(**kwargs)
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    "fields_,message",
    [
        ({"device": "gpu"}, "train.device must be auto, cpu, mps, cuda or cuda:N"),
        ({"device": "cuda:x"}, "train.device must be"),
        ({"seed": 2**64}, "train.seed"),
        ({"out_dir": " "}, "train.out_dir must name a folder"),
        ({"lr": 1e-4, "min_lr": 1e-3}, "train.min_lr = 0.001 is above train.lr"),
    ],
)
def test_train_config_cross_checks(fields_, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields_)
    for good in ("cpu", "cuda", "cuda:1", "mps", "auto"):
        TrainConfig(device=good)


@pytest.mark.parametrize(
    "typed,meant",
    [
        ("a\\€b", "a\\€b"),
        ("\\q", "\\q"),
        ("\\N{BULLET}", "•"),
        ("\\101", "A"),
        ("x\\\\y", "x\\y"),
    ],
)
def test_a_backslash_before_anything_but_an_escape_stays(typed, meant):
    assert interpret_escapes(typed) == meant


def test_an_old_attention_key_in_a_file_is_overridden_by_set_in_either_spelling(tmp_path):
    """A config file written before the [model.attn] table, overridden on the command line the new
    way (or the other way round): the override wins, as it always did, with one notice."""
    from scratchlm.config import load_config
    from scratchlm.models.blocks.attention import LEGACY_PATHS
    from scratchlm.models.presets import config_from_section

    old = tmp_path / "old.toml"
    old.write_text('[model]\nlayers = ["sliding"]\nsliding_window = 4\n')
    new = tmp_path / "new.toml"
    new.write_text('[model]\nlayers = ["sliding"]\n[model.attn]\nwindow = 4\n')
    for path, override in (
        (old, "model.attn.window=8"),
        (new, "model.sliding_window=8"),
        (old, "model.sliding_window=8"),
    ):
        with pytest.warns(FutureWarning, match=r"model\.sliding_window -> model\.attn\.window") as caught:
            section = load_config(path, [override], aliases=LEGACY_PATHS)["model"]
            assert config_from_section(section).attn.window == 8, (path.name, override)
        assert len(caught) == 1
    with pytest.raises(ConfigError, match="old spelling of model.attn.window, and both are set"):
        both = tmp_path / "both.toml"
        both.write_text('[model]\nlayers = ["sliding"]\nsliding_window = 4\n[model.attn]\nwindow = 4\n')
        load_config(both, [], aliases=LEGACY_PATHS)


def test_a_preset_takes_the_old_attention_keywords_with_a_notice():
    from scratchlm.models.presets import preset

    with pytest.warns(FutureWarning, match=r"model\.qk_norm -> model\.attn\.qk_norm"):
        old = preset("llama-tiny", qk_norm=True)
    assert old == preset("llama-tiny", attn={"qk_norm": True}) and old.attn.qk_norm is True
