"""LoRA: fine-tune a low-rank update instead of every weight (Hu et al., 2021).

A fine-tuned weight matrix ``W' = W + ΔW`` differs from the pretrained ``W`` by an update that is,
in practice, close to low rank. LoRA trains that update in factored form, ``ΔW = (α / r) · B A``
with ``A`` of shape (r, in) and ``B`` of shape (out, r), and freezes ``W``::

    y = x Wᵀ + (α / r) · (x Aᵀ) Bᵀ

For a 768 × 768 projection and ``r = 8`` that is 12,288 trainable numbers instead of 589,824.
``B`` starts at zero, so the adapted model starts exactly equal to the base model; ``A`` starts
random (Kaiming-uniform, as PEFT does), so the gradient of ``B`` is not zero. ``α / r`` keeps the
update's scale comparable across ranks (changing ``r`` does not require retuning the learning rate).

New token ids (the chat special tokens) have no pretrained rows to adapt: with ``new_rows_from``
their rows of the embedding (and output) matrix train too, and only those rows — a gradient hook
zeroes the others' gradient (PEFT's ``trainable_token_indices``). Without it a frozen
``<|im_end|>`` row could never come to outscore the others, and a model would never stop.

After training, the update can be **merged**: ``W ← W + (α / r) B A`` makes an ordinary model with
no extra cost at inference (``merge_lora``); ``unmerge`` subtracts it again. Adapters are saved
alone, in safetensors (``save_adapters``): a few hundred kilobytes for a model of megabytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from scratchlm.io import FormatError, atomic_write

ADAPTER_FORMAT = "scratchlm.lora"
ADAPTER_VERSIONS = ("1",)  # the versions load_adapters reads; adapter_bytes writes the last
DEFAULT_TARGETS = ("qkv", "proj", "up", "gate", "down")  # every linear of attention and MLP


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # readers that expect a Linear (e.g. export) see the effective weight
        return self.base.weight if self.merged else self.base.weight + self.delta()

    @property
    def bias(self):
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """ΔW = (α / r) · B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets=DEFAULT_TARGETS,
    dropout: float = 0.0,
    new_rows_from: int | None = None,
) -> list[str]:
    """Freeze every parameter of ``model`` and wrap each ``nn.Linear`` whose own name is in
    ``targets`` with :class:`LoRALinear`; return the wrapped modules' full names. With
    ``new_rows_from``, the embedding (and output) rows of ids from there on stay trainable."""
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    if new_rows_from is not None and new_rows_from < model.config.vocab_size:
        keep = torch.zeros(model.config.vocab_size, 1, device=model.tok_emb.weight.device)
        keep[new_rows_from:] = 1
        for weight in {id(w): w for w in (model.tok_emb.weight, model.lm_head.weight)}.values():
            weight.requires_grad_(True)
            # keep moves with the gradient (the model may be moved to a GPU after this)
            weight.register_hook(lambda grad, keep=keep: grad * keep.to(device=grad.device, dtype=grad.dtype))
        model.lora_new_rows_from = new_rows_from
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no linear layer named {list(targets)}; this model's are {names}")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back: an ordinary
    model (for export, or the engine) whose outputs equal the adapted model's."""
    for name, m in lora_modules(model).items():
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.base)
    return model


def adapter_bytes(model: nn.Module, **info) -> bytes:
    """The adapters alone as safetensors bytes: ``lora_A`` and ``lora_B`` of every wrapped layer and
    the trained rows of new token ids, with rank, alpha, layers and vocabulary in the metadata (and
    ``info``, e.g. the base checkpoint)."""
    from safetensors.torch import save

    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    first = next(iter(modules.values()))
    tensors = {}
    for name, m in modules.items():
        tensors[f"{name}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    start = getattr(model, "lora_new_rows_from", None)
    vocab = model.config.vocab_size
    if start is not None:
        tensors["new_rows.tok_emb"] = model.tok_emb.weight[start:].detach().cpu().contiguous()
        if not model.config.tie_embeddings:
            tensors["new_rows.lm_head"] = model.lm_head.weight[start:].detach().cpu().contiguous()
    meta = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSIONS[-1],
        "rank": str(first.rank),
        "alpha": str(first.alpha),
        "targets": json.dumps(sorted({n.rsplit(".", 1)[-1] for n in modules})),
        "vocab_size": str(vocab),
        "new_rows_from": str(start if start is not None else vocab),
        "info": json.dumps(info),
    }
    return save(tensors, metadata=meta)


def save_adapters(model: nn.Module, path: str | Path, **info) -> Path:
    path = Path(path)
    with atomic_write(path) as f:
        f.write(adapter_bytes(model, **info))
    return path


def load_adapters(model: nn.Module, path: str | Path) -> dict:
    """Wrap ``model`` as the adapters in ``path`` say and load them; returns their metadata."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise FormatError(f"{path}: not a scratchlm LoRA adapter file (format {meta.get('format')!r})")
    if meta.get("version") not in ADAPTER_VERSIONS:
        raise FormatError(
            f"{path}: scratchlm LoRA adapter version {meta.get('version')!r} is not supported (this "
            f"scratchlm reads versions {list(ADAPTER_VERSIONS)}); save the adapters again with this version"
        )
    missing = [k for k in ("rank", "alpha", "targets") if k not in meta]
    if missing:
        raise FormatError(
            f"{path}: the adapter metadata has no {missing}; the file is damaged or was not written "
            "by scratchlm: save the adapters again"
        )
    vocab = int(meta.get("vocab_size", model.config.vocab_size))
    start = int(meta.get("new_rows_from", vocab))
    if vocab > model.config.vocab_size:  # the adapters were trained with new tokens (chat): grow first
        model.grow_vocab(vocab, known=min(start, model.config.vocab_size))
    if vocab != model.config.vocab_size:
        raise FormatError(
            f"{path}: adapters for a vocabulary of {vocab} ids; this model has {model.config.vocab_size}"
        )
    wrapped = apply_lora(
        model,
        int(meta["rank"]),
        float(meta["alpha"]),
        json.loads(meta["targets"]),
        new_rows_from=start if start < vocab else None,
    )
    rows = {k: v for k, v in tensors.items() if k.startswith("new_rows.")}
    lora = {k: v for k, v in tensors.items() if not k.startswith("new_rows.")}
    expected = {f"{n}.lora_{x}" for n in wrapped for x in "AB"}
    if set(lora) != expected:
        raise FormatError(
            f"{path}: adapters for {sorted(set(lora) - expected)[:3]} / missing "
            f"{sorted(expected - set(lora))[:3]}: they were trained on another model shape"
        )
    modules = lora_modules(model)
    with torch.no_grad():
        for key, value in lora.items():
            name, _, which = key.rpartition(".")
            getattr(modules[name], which).copy_(value)
        for key, value in rows.items():
            getattr(model, key.split(".", 1)[1]).weight[start:] = value
    return {**meta, "info": json.loads(meta.get("info", "{}"))}


def merge_adapters(
    checkpoint: str | Path, adapters: str | Path, out: str | Path, tokenizer_spec: str | None = None
) -> dict:
    """Fold ``adapters`` into the base ``checkpoint``'s weights and save an ordinary checkpoint at ``out``.

    Refused when the adapters were trained on another base (the base weights' sha256 they recorded
    differs): merging them would give a wrong model. Returns the adapters' metadata."""
    from scratchlm.models.checkpoint import (
        load_checkpoint_tokenizer,
        load_model_from_checkpoint,
        read_state,
        save_model_only,
    )
    from scratchlm.tokenizers.chat import add_chat_tokens

    model, state = load_model_from_checkpoint(checkpoint)
    meta = load_adapters(model, adapters)  # grows the vocabulary if the adapters brought new tokens
    expected = meta["info"].get("base_sha256")
    actual = (read_state(checkpoint).get("files") or {}).get("model.safetensors", {}).get("sha256")
    if expected and actual != expected:
        raise ValueError(
            f"{adapters} were trained on another base (its weights' sha256 differs from "
            f"{checkpoint}'s); merging them here would give a wrong model. Their base was "
            f"{meta['info'].get('base')}"
        )
    merge_lora(model)
    try:
        tokenizer = load_checkpoint_tokenizer(checkpoint, state, tokenizer_spec)
    except (ValueError, FileNotFoundError):
        tokenizer = None
    if tokenizer is not None and int(meta.get("new_rows_from", 0)) < int(meta.get("vocab_size", 0)):
        tokenizer = add_chat_tokens(tokenizer)  # the new rows are the chat tokens'
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the adapters' vocabulary ({model.config.vocab_size}) does not fit the chat tokenizer "
                f"({tokenizer.vocab_size} ids)"
            )
    save_model_only(out, model, tokenizer=tokenizer, source=str(checkpoint), adapters=str(adapters))
    return meta
