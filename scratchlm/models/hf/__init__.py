"""Interchange with Hugging Face: import a ``transformers`` model folder, export one it loads.

A Hugging Face model folder is ``config.json`` + ``model.safetensors``. Importing maps its config
to a :class:`GPTConfig` and renames its tensors into ours; exporting does the reverse, so
``transformers`` loads the folder with ``from_pretrained`` and gives the same logits. Nothing is
downloaded: you bring the folder.

One module per family holds its config reader, its tensor-name map (a dict from Hugging Face's
names to ours, the export direction its inverse, irregular tensors in named functions) and its
exporter, which refuses what the format cannot hold. :data:`FAMILIES` below is the one table of
them, by ``model_type``; :data:`EXPORT_FAMILIES` lists what ``export_hf`` writes.

What a format cannot hold is said one property at a time: :func:`export_problems` lists, for a
config and a family, each setting that family cannot express, its value and what the family needs
(``model.mlp = 'gelu' (llama needs a gated MLP: swiglu, geglu, or relu2)``);
:func:`exportable_families` lists the families that hold a config, and :func:`export_note` says it
in one line (the trainer prints it before training). An export that is refused names the failing
properties and the fix: another ``--arch`` that holds the model, or the settings to change.

An import reads every tensor of the folder into the model or refuses: weights the config has no
place for (a file with 4 layers for a config of 2) and weights the config needs that the file lacks
are named, in Hugging Face's names; a truncated or corrupt safetensors file is named as such.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from scratchlm.io import atomic_write
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf import deepseek, diff, gemma, gpt2, llama, mistral, moe, ssm
from scratchlm.models.hf.common import cpu_state


class Family(NamedTuple):
    config_from_hf: Callable[[dict], GPTConfig]  # config.json (a dict) -> our config
    from_hf: Callable[[dict, GPTConfig], dict]  # their tensors -> our state dict
    to_hf: Callable[[GPT], tuple[dict, dict]]  # our model -> their tensors and config.json
    switches: tuple[str, ...] = ()  # of SWITCHES, those the format can hold
    # what of a config (and, given, of a model's weights) the format cannot hold, one line per
    # property; None: the exporter's own checks say it (run on a meta-device model for a config)
    problems: Callable[..., list[str]] | None = None
    # the config decisions the weights make (all-zero biases are none; relu with gate = up is ReLU²)
    settle: Callable[[GPTConfig, dict], GPTConfig] | None = None
    # tensors of a file the import leaves out on purpose, with a warning (DeepSeek-V3's MTP layer)
    skips: Callable[[str, GPTConfig], bool] | None = None


_GEMMA_SWITCHES = (
    "attn.head_dim",
    "attn.scale",
    "attn.softcap",
    "final_softcap",
    "sandwich_norm",
    "embed_scale",
)
# Switches (GPTConfig fields, "attn.x" for [model.attn]'s) that only some formats can hold; export
# refuses the others. The window is not one: the families that hold it check the layer pattern.
SWITCHES = _GEMMA_SWITCHES + ("attn.qkv_bias", "attn.qk_norm")
_HEADS = ("attn.head_dim",)  # Llama-block formats write head_dim: heads of their own width
_LLAMA = partial(Family, settle=llama.settle_config)  # Llama MLPs: relu with gate = up is ReLU²


def _problems(check: Callable[..., list[str]], *args) -> Callable[..., list[str]]:
    """A family's ``problems(config, model=None)`` from a check that takes the config (and ``args``)."""
    return lambda config, model=None: check(config, *args)


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        gpt2.config_from_hf, gpt2.from_hf, gpt2.to_hf, (), _problems(gpt2.problems), gpt2.settle_config
    ),
    "llama": _LLAMA(llama.config_from_hf, llama.from_hf, llama.to_hf, _HEADS, _problems(llama.problems)),
    "qwen2": _LLAMA(
        llama.qwen_config,
        partial(llama.from_hf, names=llama.QWEN_NAMES),
        partial(llama.qwen_to_hf, kind="qwen2"),
        _HEADS + ("attn.qkv_bias",),
        _problems(llama.qwen_problems, "qwen2"),
    ),
    "qwen3": _LLAMA(
        llama.qwen_config,
        partial(llama.from_hf, names=llama.QWEN_NAMES),
        partial(llama.qwen_to_hf, kind="qwen3"),
        _HEADS + ("attn.qk_norm",),
        _problems(llama.qwen_problems, "qwen3"),
    ),
    "mistral": _LLAMA(
        mistral.mistral_config,
        llama.from_hf,
        mistral.mistral_to_hf,
        _HEADS,
        _problems(mistral.problems, "mistral"),
    ),
    "ministral": _LLAMA(
        mistral.ministral_config,
        llama.from_hf,
        mistral.ministral_to_hf,
        _HEADS,
        _problems(mistral.problems, "ministral"),
    ),
    "gemma2": Family(gemma.config_from_hf, gemma.from_hf, gemma.to_hf, _GEMMA_SWITCHES),
    **{
        kind: Family(
            moe.config_from_hf,
            partial(moe.from_hf, kind=kind),
            partial(moe.to_hf, kind=kind),
            switches,
            partial(moe.problems, kind=kind),
        )
        for kind, switches in (
            ("mixtral", ()),
            ("qwen2_moe", ("attn.qkv_bias",)),
            ("qwen3_moe", ("attn.qk_norm",)),
        )
    },
    **{
        kind: Family(
            deepseek.config_from_hf,
            deepseek.from_hf,
            partial(deepseek.to_hf, model_type=kind),
            skips=deepseek.is_mtp_tensor,
        )
        for kind in ("deepseek_v2", "deepseek_v3")
    },
    "diffllama": _LLAMA(diff.config_from_hf, diff.from_hf, diff.to_hf, (), _problems(diff.problems)),
    "mamba": Family(ssm.mamba_config, ssm.mamba_from_hf, ssm.mamba_to_hf),
    "jamba": Family(ssm.jamba_config, ssm.jamba_from_hf, ssm.jamba_to_hf),
}
EXPORT_FAMILIES: tuple[str, ...] = tuple(FAMILIES)  # every family imports and exports
# The family a model exports to when none is named: the first that claims it, else Llama or GPT-2.
_DEFAULT_PICKERS = (
    llama.default_architecture,
    moe.default_architecture,
    deepseek.default_architecture,
    gemma.default_architecture,
    mistral.default_architecture,
    diff.default_architecture,
    ssm.default_architecture,
)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file, or an error that names it: truncated or corrupt files happen (an
    interrupted download or copy) and deserve better than a traceback."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (listed in the folder's index, or expected in it)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({e}); download or copy it again") from None


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.exists():
        return _load_safetensors(single)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(_load_safetensors(folder / shard))
        return tensors
    raise FileNotFoundError(
        f"{folder}: no model.safetensors (or index); only safetensors folders are read, never pickles"
    )


def config_from_hf(hf: dict) -> GPTConfig:
    """Our config for a Hugging Face ``config.json`` (as a dict)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; scratchlm imports {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type].config_from_hf(hf)


# Tensors a Hugging Face file may hold that are not weights: buffers older versions saved.
_NOT_WEIGHTS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def _layer_summary(names: list[str], limit: int = 6) -> str:
    """Names, at most ``limit`` of them, and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def import_hf(folder: str | Path) -> GPT:
    """Build our model from a Hugging Face folder of any family in :data:`FAMILIES`. Every tensor
    of the folder must land in the model and every weight of the model must come from the folder:
    otherwise the import is refused, naming the tensors (in Hugging Face's names)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder}: no config.json; expected a Hugging Face model folder")
    hf = json.loads(config_path.read_text())
    config = config_from_hf(hf)
    family = FAMILIES[hf["model_type"]]
    tensors = _read_hf_tensors(folder)
    if family.settle is not None:
        config = family.settle(config, tensors)
    ours = family.from_hf(tensors, config)
    model = GPT(config)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    # The tensors this model is, in Hugging Face's names (the export's), against the file's.
    expected = set(family.to_hf(model)[0])
    skips = family.skips or (lambda name, config: False)
    found = {name for name in tensors if not (name.endswith(_NOT_WEIGHTS) or skips(name, config))}
    if config.tie_embeddings:
        found.discard("lm_head.weight")  # some files keep the tied head as well
    unused, lacking = sorted(found - expected), sorted(expected - found)
    if unused or lacking or missing or unexpected:
        layers = f"config.json's {config.n_layer} layers"
        what = []
        if unused or unexpected:
            what.append(f"weights {layers} have no place for: {_layer_summary(unused or unexpected)}")
        if lacking or missing:
            what.append(f"weights {layers} need that the file lacks: {_layer_summary(lacking or missing)}")
        raise ValueError(
            f"{folder}: the tensors do not match config.json ({'; '.join(what)}); "
            "the config and the weights must come from the same model"
        )
    return model.eval()


def default_family(config: GPTConfig) -> str:
    """The family a model exports to when none is named."""
    picked = next((name for pick in _DEFAULT_PICKERS if (name := pick(config))), None)
    return picked or ("llama" if config.position == "rope" else "gpt2")


def _switch_problems(config: GPTConfig, architecture: str) -> list[str]:
    """The switches set in ``config`` that the format cannot hold (never dropped silently)."""
    holds = FAMILIES[architecture].switches
    found = [name for name in SWITCHES if name not in holds and _switch(config, name)]
    if "attn.head_dim" in found and config.head_dim * config.n_head == config.d_model:
        found.remove("attn.head_dim")  # heads that split d_model: every format holds that
    problems = []
    for name in found:
        can = [family for family, f in FAMILIES.items() if name in f.switches]
        problems.append(
            f"model.{name} = {_switch(config, name)!r} ({architecture} cannot express it; "
            f"formats that can: {', '.join(can)})"
        )
    return problems


def _switch(config: GPTConfig, name: str):
    """A switch's value: ``"attn.softcap"`` is ``config.attn.softcap``."""
    table, _, field = name.rpartition(".")
    return getattr(getattr(config, table) if table else config, field)


def _converted(model: GPT, architecture: str) -> tuple[dict, dict]:
    """The format's tensors and config.json for ``model``, read back before anything is written:
    every tensor of the model must have its place in the format, and the format's model must need
    no tensor this one lacks (a bias GPT-2 always has, say); otherwise the folder would hold
    another model, or one that does not load."""
    family = FAMILIES[architecture]
    tensors, hf = family.to_hf(model)
    exported = family.config_from_hf(hf)
    with torch.device("meta"):
        expected = set(GPT(exported).state_dict())
    tied = {"lm_head.weight"} if exported.tie_embeddings else set()
    back, ours = set(family.from_hf(tensors, exported)) - tied, set(cpu_state(model)) - tied
    lost, lacking = sorted(ours - back), sorted((expected - tied) - back)
    if lost or lacking:
        what = (f"no place for {', '.join(lost[:4])}" if lost else "") + ("; " if lost and lacking else "")
        what += f"tensors this model lacks: {', '.join(lacking[:4])}" if lacking else ""
        raise ValueError(what)
    return tensors, hf


def export_problems(config: GPTConfig, family: str, model: GPT | None = None) -> list[str]:
    """Why ``family``'s format cannot hold a model of ``config``: one line per failing property,
    naming its value and what the format needs; [] when it can. With ``model``, its weights are
    checked too (a nonzero router bias, say); without, a model of ``config`` built on the meta
    device (no memory) goes through the exporter."""
    if family not in FAMILIES:
        raise ValueError(f"architecture must be one of {', '.join(sorted(FAMILIES))}, got {family!r}")
    f = FAMILIES[family]
    found = _switch_problems(config, family) + (f.problems(config, model) if f.problems else [])
    if found:
        return found
    if model is None:
        with torch.device("meta"):
            model = GPT(config)
    try:
        _converted(model, family)
    except ValueError as e:
        return [str(e)]
    except (RuntimeError, NotImplementedError):
        pass  # a check that reads weights cannot run on the meta device: the export runs it
    return []


def exportable_families(config: GPTConfig) -> list[str]:
    """The families whose format holds a model of ``config`` (the default one first), [] if none."""
    holds = [family for family in FAMILIES if not export_problems(config, family)]
    default = default_family(config)
    return sorted(holds, key=lambda family: family != default)


def export_note(config: GPTConfig) -> str:
    """One line on where a model of ``config`` can go: the export formats that hold it, or why
    none does (the default family's failing properties), for the trainer's header."""
    holds = exportable_families(config)
    if holds:
        also = f" (also {', '.join(holds[1:])})" if len(holds) > 1 else ""
        return f"export: `scratchlm model export` writes it as {holds[0]}{also}"
    default = default_family(config)
    return (
        f"export: no Hugging Face format holds this model ({default}: "
        f"{'; '.join(export_problems(config, default))})"
    )


def _refusal(config: GPTConfig, architecture: str, problems: list[str], model: GPT | None) -> str:
    """The refusal of an export: what fails, and what to do instead."""
    others = [
        f for f in exportable_families(config) if f != architecture and not export_problems(config, f, model)
    ]
    if others:
        fix = f"it exports as {', '.join(others)}: pass --arch {others[0]}"
    else:
        fix = (
            "no Hugging Face format holds it: set what the format needs in the model's [model] config "
            "(or --set model.KEY=VALUE) and train again"
        )
    return f"{architecture} export cannot hold this model: {'; '.join(problems)}. Fix: {fix}"


def export_hf(model: GPT, folder: str | Path, architecture: str | None = None, tokenizer=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads (any family in
    :data:`EXPORT_FAMILIES`; by default the one :func:`default_family` picks); with ``tokenizer``,
    also the tokenizer in Hugging Face form (with the chat template of a chat tokenizer) and a
    ``generation_config.json`` whose end of sequence is the end of a turn. A model the format
    cannot hold is refused before anything is written, naming each failing property and the fix."""
    c = model.config
    architecture = architecture or default_family(c)
    problems = export_problems(c, architecture, model)
    if not problems:
        try:
            tensors, hf = _converted(model, architecture)
        except ValueError as e:
            problems = [str(e)]
    if problems:
        raise ValueError(_refusal(c, architecture, problems, model))
    if tokenizer is not None and tokenizer.vocab_size > c.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids, the model {c.vocab_size}: not its tokenizer"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / "model.safetensors") as f:
        from safetensors.torch import save

        f.write(save(tensors, metadata={"format": "pt"}))
    if tokenizer is not None:
        from scratchlm.tokenizers.chat import IM_END
        from scratchlm.tokenizers.hf import save_hf_tokenizer

        save_hf_tokenizer(tokenizer, folder, model_max_length=c.block_size)
        specials = tokenizer.special_tokens
        eos = specials.get(IM_END, tokenizer.eot_token)
        hf.update({"eos_token_id": eos, "bos_token_id": None, "pad_token_id": tokenizer.eot_token})
        with atomic_write(folder / "generation_config.json", "w") as f:
            json.dump(
                {"eos_token_id": eos, "pad_token_id": tokenizer.eot_token, "bos_token_id": None}, f, indent=1
            )
    with atomic_write(folder / "config.json", "w") as f:
        json.dump({**hf, "torch_dtype": "float32"}, f, indent=1)
    return folder
