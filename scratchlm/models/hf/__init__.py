"""Interchange with Hugging Face: import a ``transformers`` model folder, export one it loads.

A Hugging Face model folder is ``config.json`` + ``model.safetensors``. Importing maps its config
to a :class:`GPTConfig` and renames its tensors into ours; exporting does the reverse, so
``transformers`` loads the folder with ``from_pretrained`` and gives the same logits. Nothing is
downloaded: you bring the folder.

One module per family holds its config reader, its tensor-name map (a dict from Hugging Face's
names to ours, the export direction its inverse, irregular tensors in named functions) and its
exporter, which refuses what the format cannot hold. :data:`FAMILIES` below is the one table of
them, by ``model_type``; :data:`EXPORT_FAMILIES` lists what ``export_hf`` writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
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

FAMILIES: dict[str, Family] = {
    "gpt2": Family(gpt2.config_from_hf, gpt2.from_hf, gpt2.to_hf),
    "llama": Family(llama.config_from_hf, llama.from_hf, llama.to_hf),
    "mistral": Family(mistral.mistral_config, llama.from_hf, mistral.mistral_to_hf),
    "ministral": Family(mistral.ministral_config, llama.from_hf, mistral.ministral_to_hf),
    "gemma2": Family(gemma.config_from_hf, gemma.from_hf, gemma.to_hf, _GEMMA_SWITCHES),
    "mixtral": Family(
        moe.config_from_hf, partial(moe.from_hf, kind="mixtral"), partial(moe.to_hf, kind="mixtral")
    ),
    "qwen2_moe": Family(
        moe.config_from_hf,
        partial(moe.from_hf, kind="qwen2_moe"),
        partial(moe.to_hf, kind="qwen2_moe"),
        ("attn.qkv_bias",),
    ),
    "qwen3_moe": Family(
        moe.config_from_hf,
        partial(moe.from_hf, kind="qwen3_moe"),
        partial(moe.to_hf, kind="qwen3_moe"),
        ("attn.qk_norm",),
    ),
    "deepseek_v2": Family(
        deepseek.config_from_hf, deepseek.from_hf, partial(deepseek.to_hf, model_type="deepseek_v2")
    ),
    "deepseek_v3": Family(
        deepseek.config_from_hf, deepseek.from_hf, partial(deepseek.to_hf, model_type="deepseek_v3")
    ),
    "diffllama": Family(diff.config_from_hf, diff.from_hf, diff.to_hf),
    "mamba": Family(ssm.mamba_config, ssm.mamba_from_hf, ssm.mamba_to_hf),
    "jamba": Family(ssm.jamba_config, ssm.jamba_from_hf, ssm.jamba_to_hf),
}
EXPORT_FAMILIES: tuple[str, ...] = tuple(FAMILIES)  # every family imports and exports
# The family a model exports to when none is named: the first that claims it, else Llama or GPT-2.
_DEFAULT_PICKERS = (
    moe.default_architecture,
    deepseek.default_architecture,
    gemma.default_architecture,
    mistral.default_architecture,
    diff.default_architecture,
    ssm.default_architecture,
)


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(str(folder / shard)))
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


def import_hf(folder: str | Path) -> GPT:
    """Build our model from a Hugging Face folder of any family in :data:`FAMILIES`."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    config = config_from_hf(hf)
    tensors = _read_hf_tensors(folder)
    ours = FAMILIES[hf["model_type"]].from_hf(tensors, config)
    model = GPT(config)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"{folder}: tensors do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval()


def default_family(config: GPTConfig) -> str:
    """The family a model exports to when none is named."""
    picked = next((name for pick in _DEFAULT_PICKERS if (name := pick(config))), None)
    return picked or ("llama" if config.position == "rope" else "gpt2")


def check_switches(config: GPTConfig, architecture: str) -> None:
    """Refuse a switch the format cannot hold, never drop one silently."""
    holds = FAMILIES[architecture].switches
    found = [name for name in SWITCHES if name not in holds and _switch(config, name)]
    if "attn.head_dim" in found and config.head_dim * config.n_head == config.d_model:
        found.remove("attn.head_dim")  # heads that split d_model: every format holds that
    if found:
        can = [name for name, family in FAMILIES.items() if set(found) <= set(family.switches)]
        where = f"; formats that can: {', '.join(can)}" if can else "; no single format holds them all"
        raise ValueError(f"{architecture} export cannot express model.{', model.'.join(found)}{where}")


def _switch(config: GPTConfig, name: str):
    """A switch's value: ``"attn.softcap"`` is ``config.attn.softcap``."""
    table, _, field = name.rpartition(".")
    return getattr(getattr(config, table) if table else config, field)


def export_hf(model: GPT, folder: str | Path, architecture: str | None = None, tokenizer=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads (any family in
    :data:`EXPORT_FAMILIES`; by default the one :func:`default_family` picks); with ``tokenizer``, also the tokenizer in Hugging Face form
    (with the chat template of a chat tokenizer) and a ``generation_config.json`` whose end of
    sequence is the end of a turn."""
    c = model.config
    architecture = architecture or default_family(c)
    if architecture not in FAMILIES:
        raise ValueError(f"architecture must be one of {', '.join(sorted(FAMILIES))}, got {architecture!r}")
    if architecture in ("gpt2", "llama") and any(kind != ("attention", "dense") for kind in c.layer_kinds()):
        raise ValueError(f"{architecture} export needs every layer to be attention + a dense MLP")
    check_switches(c, architecture)
    tensors, hf = FAMILIES[architecture].to_hf(model)
    # Read the export back before writing it: every tensor of the model must have its place in the
    # format, and the format's model must need no tensor this one lacks (a bias GPT-2 always has,
    # say); otherwise the folder would hold another model, or one that does not load.
    family = FAMILIES[architecture]
    exported = family.config_from_hf(hf)
    with torch.device("meta"):
        expected = set(GPT(exported).state_dict())
    tied = {"lm_head.weight"} if exported.tie_embeddings else set()
    back, ours = set(family.from_hf(tensors, exported)) - tied, set(cpu_state(model)) - tied
    lost, lacking = sorted(ours - back), sorted((expected - tied) - back)
    if lost or lacking:
        what = (f"no place for {', '.join(lost[:4])}" if lost else "") + ("; " if lost and lacking else "")
        what += f"tensors this model lacks: {', '.join(lacking[:4])}" if lacking else ""
        raise ValueError(f"{architecture} export cannot hold this model ({what}); choose another --arch")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / "model.safetensors") as f:
        from safetensors.torch import save

        f.write(save(tensors, metadata={"format": "pt"}))
    if tokenizer is not None:
        from scratchlm.tokenizers.chat import IM_END
        from scratchlm.tokenizers.hf import save_hf_tokenizer

        if tokenizer.vocab_size > c.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids, the model {c.vocab_size}: not its tokenizer"
            )
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
