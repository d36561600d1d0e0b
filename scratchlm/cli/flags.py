"""The command line's shared flag vocabulary: each name has one meaning on every command.

Every flag that more than one command takes is added by one function below, with one help text
(a command may append what the value is *for* it, after a colon) and one default. A command
never spells these names itself; ``tests/cli`` walks every parser to hold that.

==================  ==========================================================  ===================
flag                meaning                                                     default
==================  ==========================================================  ===================
--checkpoint DIR    a checkpoint folder (runs/x/best, an imported model)        (required)
--tokenizer SPEC    a tokenizer JSON file, or gpt2                              the checkpoint's
--device NAME       where the model runs: cuda, cuda:N, mps, cpu                auto (cuda > mps > cpu)
--dtype NAME        weights and KV cache dtype (registry: serve's DTYPES)       float32
--out PATH          where the command writes its result (file or folder)        per command
--seed N            seed of every random choice the command makes               1337
--config FILE       a TOML config (configs/*.toml)                              none
--set S.K=V         override one config value (repeatable)                      none
--resume            continue the run in the output folder where it stopped      off
--overwrite         start over in an output folder that holds another run       off
--json              print exactly one JSON object on stdout                     off
--quiet             no progress bars (the report is still printed)              off
--dataset DIR       a prepared dataset folder (``scratchlm data prepare``)       (required)
--text-file FILE    a plain UTF-8 text file                                     none
--shards DIR        a token-shards folder (``scratchlm data tokenize``)          the checkpoint's
--data FILE         a post-training method's JSONL training records             (required)
--val-data FILE     held-out JSONL records of the same form as --data           5% of --data
--prompts FILE      JSONL, one request (prompt) per line                        (required)
--eval-prompts F    held-out JSONL prompts with answers, for measuring          none
--preset NAME       a model preset (registry: PRESETS)                          none
--max-new-tokens N  tokens to generate per reply or sample, at most             300 (sample, generate)
--num-samples N     samples to draw                                             per command
--temperature T     sampling temperature; 0 = greedy                            0.8 (sample, generate)
--batch-size N      sequences per batch                                         per command
--context N         positions per sequence                                      per command
--lora-rank R       train rank-R LoRA adapters instead of every weight          full fine-tuning
--reward-model DIR  a ``scratchlm reward-model`` checkpoint                      none
--skip-invalid      skip (and count) bad input lines instead of stopping        off
--plot FILE         save a PNG here                                             per command
--errors MODE       invalid UTF-8 in a text file: strict (fail, naming the      strict
                    byte offset) or replace (U+FFFD, counted)
==================  ==========================================================  ===================

"Per command" defaults are the flag's one meaning at a size that suits the command (a 300-token
sample, a 32-token reply); each command's ``--help`` shows its own (:class:`HelpFormatter` adds
"(default X)" to every flag that has a default). ``sample`` and ``generate`` share theirs:
:data:`MAX_NEW_TOKENS` and :data:`TEMPERATURE`. A flag that only sizes the work (a batch, a KV
block) is checked while parsing (:data:`positive_int`, :data:`non_negative_int`); sampling values are
checked by the one sampling check of :func:`scratchlm.generate.sampling.check_sampling`, which the
engine's requests pass through too. Every integer flag reads ``1e3`` as 1000, on every command.

Old spellings still work for now; each prints one line on stderr naming the new flag:

==========================  ======================  ==========================================
command                     old                     new
==========================  ======================  ==========================================
tokenizer train, compare    --input FILE            --text-file FILE
tokenizer encode            --file FILE             --text-file FILE
eval                        --data DIR              --shards DIR
generate                    --input FILE            --prompts FILE
generate                    --output FILE           --out FILE
generate                    --block-size N          --kv-block-size N (model.block_size is
                                                    the context, not the KV block)
generate                    --num-blocks N          --kv-blocks N
critique-revise             --num-samples N         --candidates N
model info, shapes          --batch N               --batch-size N
model shapes                --seq N                 --context N
==========================  ======================  ==========================================
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Callable, Iterable

SEED = 1337  # the project's seed: train.seed's default, and the data split's
HELP: dict[str, str] = {}  # shared flag -> its help text (a command may add ": what it is for here")


class Registry:
    """Choices read from the registry that owns them, on first use: ``scratchlm --help`` and the
    commands that do not need them import nothing heavy (PRESETS lives beside torch)."""

    def __init__(self, load: Callable[[], Iterable[str]]):
        self._load, self._names = load, None

    def names(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = tuple(self._load())
        return self._names

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name) -> bool:
        return name in self.names()

    def __len__(self) -> int:
        return len(self.names())

    def __str__(self) -> str:  # for "%(registry)s" in help texts
        return ", ".join(self.names())


class HelpFormatter(argparse.HelpFormatter):
    """Every command's help: each flag's default is shown (where it has one), and the old spellings
    are left out (they still parse, but are no longer taught)."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or action.required
            or not action.option_strings
            or "default" in help
        ):
            return help
        shown = (f"{default:g}" if isinstance(default, float) else str(default)).replace("%", "%%")
        return f"{help} (default {shown})".lstrip()

    def _format_action_invocation(self, action):
        old = getattr(action, "deprecated", ())
        if old:
            action = copy.copy(action)
            action.option_strings = [o for o in action.option_strings if o not in old]
        return super()._format_action_invocation(action)


class _Deprecated:
    """Mixed into an action whose old spellings are still accepted: warn once per use, then act."""

    deprecated: frozenset[str] = frozenset()

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated and os.environ.get("RANK", "0") == "0":
            print(
                f"scratchlm: warning: {option_string} is deprecated; use {self.option_strings[0]}",
                file=sys.stderr,
            )
        super().__call__(parser, namespace, values, option_string)


class _Noted:
    """Mixed into every action :func:`add` makes: the flags a user typed are noted on the namespace
    (:func:`given`), so a command can tell a value given from a default (``--beam`` refuses a typed
    ``--temperature``, whatever its value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        noted = set(getattr(namespace, "_given", ()))
        namespace._given = noted | {self.option_strings[0]}
        super().__call__(parser, namespace, values, option_string)


def given(args) -> set[str]:
    """The flags (their first spelling) typed on the command line, among those added by :func:`add`."""
    return set(getattr(args, "_given", ()))


def add(parser, name: str, *old: str, **kwargs) -> argparse.Action:
    """``parser.add_argument(name, ...)`` that also accepts the ``old`` spellings, with a notice; the
    flag, when typed, is noted (:func:`given`)."""
    action = parser.add_argument(name, *old, **kwargs)
    mixins = (_Deprecated, _Noted) if old else (_Noted,)
    action.__class__ = type(f"Noted{type(action).__name__}", (*mixins, type(action)), {})
    if old:
        action.deprecated = frozenset(old)
    return action


def _shared(name: str, help: str):
    """Declare a shared flag: its one help text, and a marker on every action it adds."""
    HELP[name] = help

    def mark(action: argparse.Action) -> argparse.Action:
        action.shared = name
        return action

    return mark


def _help(name: str, what: str | None) -> str:
    return HELP[name] + (f": {what}" if what else "")


_checkpoint = _shared("--checkpoint", "checkpoint folder (e.g. runs/x/best)")
_tokenizer = _shared("--tokenizer", "tokenizer JSON file, or gpt2")
_device = _shared(
    "--device", "where the model runs: cuda, cuda:N, mps or cpu (default: auto, the best available)"
)
_dtype = _shared(
    "--dtype", "weights and KV cache: %(registry)s (bfloat16 halves the bytes each decode step reads)"
)
_out = _shared("--out", "where to write")
_seed = _shared("--seed", "seed of every random choice the command makes")
_config = _shared("--config", "a TOML config (configs/<name>.toml)")
_set = _shared("--set", "override one config value, section.key=value (repeatable)")
_resume = _shared("--resume", "continue the run in the output folder where it stopped")
_overwrite = _shared(
    "--overwrite", "start over in an output folder that holds another run (deletes its checkpoints)"
)
_json = _shared("--json", "print one JSON object instead of text")
_quiet = _shared("--quiet", "no progress bars (the report is still printed)")
_dataset = _shared("--dataset", "a prepared dataset folder (scratchlm data prepare)")
_text_file = _shared("--text-file", "a plain UTF-8 text file")
_shards = _shared("--shards", "token-shards folder (scratchlm data tokenize)")
_data = _shared("--data", "JSONL training records")
_val_data = _shared(
    "--val-data", "held-out JSONL records like --data (default: 5%% of --data, set aside by hash)"
)
_prompts = _shared("--prompts", "JSONL, one prompt per line")
_eval_prompts = _shared("--eval-prompts", "held-out JSONL prompts with answers")
_preset = _shared("--preset", "a model preset: %(registry)s")
_max_new_tokens = _shared("--max-new-tokens", "tokens to generate at most, per reply or sample")
_num_samples = _shared("--num-samples", "samples to draw")
_temperature = _shared("--temperature", "sampling temperature (0 = greedy)")
_batch_size = _shared("--batch-size", "sequences per batch")
_context = _shared("--context", "positions per sequence")
_lora_rank = _shared("--lora-rank", "train rank-R LoRA adapters instead of every weight")
_reward_model = _shared("--reward-model", "a `scratchlm reward-model` checkpoint")
_skip_invalid = _shared("--skip-invalid", "skip (and count) bad input lines instead of stopping")
_plot = _shared("--plot", "save a PNG here")
_errors = _shared(
    "--errors",
    "invalid UTF-8 in a text file: strict fails naming the byte offset, replace substitutes U+FFFD",
)


def checkpoint(p, what: str | None = None, required: bool = True):
    return _checkpoint(add(p, "--checkpoint", required=required, help=_help("--checkpoint", what)))


def tokenizer(p, required: bool = False):
    what = "" if required else " (default: the one the checkpoint carries or was trained with)"
    return _tokenizer(add(p, "--tokenizer", required=required, help=HELP["--tokenizer"] + what))


def device(p):
    return _device(add(p, "--device", help=HELP["--device"]))


def _dtypes():
    from scratchlm.serve.engine import DTYPES

    return DTYPES


def _presets():
    from scratchlm.models.presets import PRESETS

    return PRESETS


def dtype(p):
    action = add(
        p, "--dtype", default="float32", choices=Registry(_dtypes), metavar="DTYPE", help=HELP["--dtype"]
    )
    action.registry = action.choices
    return _dtype(action)


def out(p, what: str, required: bool = True, old: tuple[str, ...] = ()):
    return _out(add(p, "--out", *old, required=required, help=_help("--out", what)))


def seed(p):
    return _seed(add(p, "--seed", type=integer, default=SEED, help=HELP["--seed"]))


def config(p, what: str | None = None):
    return _config(add(p, "--config", help=_help("--config", what)))


def overrides(p, what: str | None = None):
    return _set(
        add(p, "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=_help("--set", what))
    )


def resume_or_overwrite(p):
    mode = p.add_mutually_exclusive_group()
    _resume(add(mode, "--resume", action="store_true", help=HELP["--resume"]))
    _overwrite(add(mode, "--overwrite", action="store_true", help=HELP["--overwrite"]))


def output(p, progress: bool = True):
    """``--json``, and ``--quiet`` on commands that show progress bars."""
    _json(add(p, "--json", action="store_true", help=HELP["--json"]))
    if progress:
        _quiet(add(p, "--quiet", action="store_true", help=HELP["--quiet"]))


def refuse_set_beside_its_flag(sets: list[str], flag_keys: dict[str, tuple[str, object]]) -> None:
    """One rule for every command: a config key that a flag sets (``train.out_dir`` by ``--out``,
    ``dpo.beta`` by ``--beta``) is refused in ``--set`` when that flag is given too, so that no value
    silently replaces another. ``flag_keys`` maps each ``section.key`` a flag of the command sets to
    (the flag, its value: None, or False for an on/off flag, when the flag is not given)."""
    given = {item.split("=", 1)[0].strip() for item in sets if "=" in item}
    for dotted, (flag, value) in flag_keys.items():
        if dotted in given and value is not None and value is not False:
            raise ValueError(
                f"--set {dotted} conflicts with {flag}, which sets {dotted}: use {flag} (and leave "
                f"{dotted} out of --set)"
            )


def show_progress(args) -> bool:
    return not (getattr(args, "json", False) or getattr(args, "quiet", False))


def dataset(p, what: str | None = None, required: bool = True):
    return _dataset(add(p, "--dataset", required=required, help=_help("--dataset", what)))


def text_file(p, what: str | None = None, old: tuple[str, ...] = ()):
    return _text_file(add(p, "--text-file", *old, help=_help("--text-file", what)))


def shards(p, what: str | None = None, old: tuple[str, ...] = ()):
    return _shards(add(p, "--shards", *old, help=_help("--shards", what)))


def data(p, what: str):
    return _data(add(p, "--data", required=True, help=_help("--data", what)))


def val_data(p):
    return _val_data(add(p, "--val-data", help=HELP["--val-data"]))


def prompts(p, what: str | None = None, old: tuple[str, ...] = ()):
    return _prompts(add(p, "--prompts", *old, required=True, help=_help("--prompts", what)))


def eval_prompts(p, what: str | None = None):
    return _eval_prompts(add(p, "--eval-prompts", help=_help("--eval-prompts", what)))


def preset(p):
    action = add(p, "--preset", metavar="NAME", help=HELP["--preset"])
    action.registry = Registry(_presets)  # listed in the help; the model config checks the name
    return _preset(action)


# What `sample` and `generate` do when a request does not say: one reply of at most 300 new tokens at
# temperature 0.8 (nanoGPT's sample.py). The Python API's SamplingParams keeps the OpenAI completions
# defaults (16 tokens at temperature 1), as vLLM's does.
MAX_NEW_TOKENS = 300
TEMPERATURE = 0.8


def _integral(text: str) -> int | None:
    """An integer written as a float (``1e9``), else None."""
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _number(kind: type, ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` number that ``ok`` allows. For flags that only size the
    work (a batch, a KV block): the value is refused while parsing, before any file is read."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = _integral(text) if kind is int else None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# Every integer flag reads its value with one of these (1e3 is read as 1000 by all of them).
positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
# A sampling count (--max-new-tokens, --num-samples, --beam, --top-k): its range is the sampling rule's,
# checked by check_sampling with the message the engine's requests get too.
integer = _number(int, lambda v: True, "an integer")
positive_float = _number(float, lambda v: v > 0, "a number > 0")


def max_new_tokens(p, default: int = MAX_NEW_TOKENS, what: str | None = None):
    return _max_new_tokens(
        add(p, "--max-new-tokens", type=integer, default=default, help=_help("--max-new-tokens", what))
    )


def num_samples(p, default: int):
    return _num_samples(add(p, "--num-samples", type=integer, default=default, help=HELP["--num-samples"]))


def temperature(p, default: float = TEMPERATURE, what: str | None = None):
    return _temperature(
        add(p, "--temperature", type=float, default=default, help=_help("--temperature", what))
    )


def batch_size(p, default: int, what: str | None = None, old: tuple[str, ...] = ()):
    return _batch_size(
        add(p, "--batch-size", *old, type=positive_int, default=default, help=_help("--batch-size", what))
    )


def context(p, default: int | None, what: str | None = None, old: tuple[str, ...] = ()):
    return _context(
        add(
            p,
            "--context",
            *old,
            type=positive_int,
            default=default,
            help=_help("--context", what)
            + ("" if default is not None else " (default: the model's context)"),
        )
    )


def lora_rank(p):
    return _lora_rank(add(p, "--lora-rank", type=non_negative_int, help=HELP["--lora-rank"] + " (0 = off)"))


def reward_model(p, what: str | None = None):
    return _reward_model(add(p, "--reward-model", help=_help("--reward-model", what)))


def skip_invalid(p):
    return _skip_invalid(add(p, "--skip-invalid", action="store_true", help=HELP["--skip-invalid"]))


def plot(p, default: str | None = None):
    return _plot(add(p, "--plot", default=default, help=HELP["--plot"]))


def errors(p):
    return _errors(add(p, "--errors", choices=["strict", "replace"], default="strict", help=HELP["--errors"]))
