"""The chat trainer: what every post-training method shares, on top of the pretraining loop.

Supervised fine-tuning, DPO, the reward model and RL (PPO, GRPO) all start from a pretrained
checkpoint and train a chat model. :class:`ChatTrainer` holds what they have in common, and each
method is a sibling subclass that adds its data, its loss and its evaluation:

* **the chat tokenizer**: the base checkpoint's tokenizer plus the chat template's special tokens
  (:mod:`scratchlm.tokenizers.chat`), and the template itself;
* **the grown vocabulary**: the base model gets fresh embedding rows for those tokens
  (``GPT.grow_vocab``);
* **LoRA** (Hu et al., 2021; :mod:`scratchlm.posttrain.lora`): with ``lora_rank > 0`` only
  low-rank adapters (and the new tokens' rows) train. Checkpoints hold the *merged* weights (any
  reader — the engine, ``sample``, ``export`` — sees an ordinary model) plus
  ``adapters.safetensors``; resuming restores the base from the base checkpoint and the adapters
  from there, and refuses a base whose weights changed;
* **the shared settings** (:class:`ChatConfig`: the base, its tokenizer, the data and its
  held-out part, LoRA) and their record in each checkpoint (``state[method]``, with the base's
  weights' sha256).

The loop itself — checkpoints and exact resume, DDP and FSDP, metrics, early stopping — is the
pretraining trainer's (:class:`scratchlm.train.trainer.Trainer`), through its hooks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from scratchlm.config import ConfigError, Rule, validate
from scratchlm.models.checkpoint import (
    load_model_from_checkpoint,
    load_tensors,
    read_state,
)
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.posttrain.data import split_held_out
from scratchlm.posttrain.lora import DEFAULT_TARGETS, adapter_bytes, apply_lora, lora_modules
from scratchlm.serve import chat
from scratchlm.tokenizers.chat import ChatTemplate, missing_template_characters
from scratchlm.train.config import TrainConfig
from scratchlm.train.trainer import Trainer

CHAT_RULES = {
    "lora_rank": Rule(min=0, why="0 = full fine-tuning"),
    "lora_alpha": Rule(above=0),
    "lora_dropout": Rule(min=0, below=1),
    "val_fraction": Rule(min=0, below=1),
    "eval_max_tokens": Rule(min=1),
}


@dataclass
class ChatConfig:
    """The settings every post-training method has; each method's config adds its own fields,
    its ``[section]`` name, its rules and what its data is."""

    base: str = ""  # the pretrained checkpoint folder (resolved once: a moving `best` link cannot change it)
    tokenizer: str | None = None  # the base's tokenizer (a JSON file or gpt2), for an imported base
    data: str = ""  # the method's JSONL (see DATA)
    val_data: str | None = None  # held-out JSONL; default: val_fraction of data, set aside by hash
    val_fraction: float = 0.05
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    skip_invalid: bool = False
    eval_max_tokens: int = 32  # reply length at most, for the exact-match evaluation
    # False: leave <|im_end|> out of the mask (the classic bug, for the docs' demo)
    learn_end_of_turn: bool = True
    # several conversations per row, attention kept within each (SFT only; others refuse it)
    packing: bool = False

    SECTION: ClassVar[str] = ""
    RULES: ClassVar[dict] = CHAT_RULES
    DATA: ClassVar[str] = ""

    def __post_init__(self):
        validate(self, self.SECTION, self.RULES)
        if not self.base or not self.data:
            raise ConfigError(
                f"{self.SECTION}.base (a checkpoint) and {self.SECTION}.data ({self.DATA}) are required"
            )

    @classmethod
    def from_dict(cls, d: dict):
        from scratchlm.config import dataclass_from_dict

        return dataclass_from_dict(cls, d, cls.SECTION)


# The [train] defaults for fine-tuning where they differ from pretraining's: a short warmup, decay
# to 0, no weight decay (it would pull the pretrained weights towards 0), up to 64 held-out
# conversations, and a sample reply at each evaluation (sample_tokens > 0 turns it on).
CHAT_TRAIN_DEFAULTS = {
    "warmup_steps": 20,
    "min_lr": 0.0,
    "weight_decay": 0.0,
    "eval_windows": 64,
    "sample_tokens": 1,
    "max_steps": 500,
    "eval_interval": 100,
    "batch_size": 16,
}


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device="cpu"):
    """Rendered (ids, mask) rows -> x, y, mask tensors, padded to the longest row."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    m = torch.zeros((len(rows), T))
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        m[i, :n] = torch.tensor(mask[1:], dtype=torch.float32)  # the mask belongs to the predicted token
    return x.to(device), y.to(device), m.to(device)


class ChatTrainer(Trainer):
    """A chat model trained from a base checkpoint. A method sets ``method`` (what a checkpoint
    records: ``state["method"]``, and its settings under that key) and defines ``_prepare_data``
    (calling :meth:`_prepare_tokenizer` first), ``_initial_model`` (from :meth:`_load_base_model`),
    ``_loss`` and ``evaluate``."""

    method: ClassVar[str] = ""
    model_adds_auxiliary = False  # the loss is built from logits: the loop adds the blocks' auxiliary losses

    def __init__(self, settings: ChatConfig, cfg: TrainConfig, **kwargs):
        self.settings = settings
        settings.base = str(Path(settings.base).resolve())  # `runs/base/best` -> the step folder it names now
        cfg.data = settings.data
        super().__init__({}, cfg, **kwargs)

    # --- tokenizer, data, base model --------------------------------------------------------
    def _prepare_tokenizer(self) -> None:
        """The base checkpoint's tokenizer with the chat tokens, the template, the grown model config."""
        s = self.settings
        state = read_state(s.base)
        self.base_sha256 = (state.get("files") or {}).get("model.safetensors", {}).get("sha256")
        self.base_tokenizer, self.tokenizer = chat.chat_tokenizers(s.base, state, s.tokenizer)
        missing = missing_template_characters(self.base_tokenizer)
        if missing:
            self.log(
                f"the base's character vocabulary cannot spell the chat template's role names: added "
                f"{''.join(missing)!r} as new characters (fresh rows; its special tokens move up "
                f"{len(missing)} ids)"
            )
        self.template = ChatTemplate(self.tokenizer, learn_end_of_turn=s.learn_end_of_turn)
        self.model_config = GPTConfig.from_dict(
            {**state["model"], "vocab_size": max(state["model"]["vocab_size"], self.tokenizer.vocab_size)}
        )
        self.eval_max_tokens = min(s.eval_max_tokens, self.model_config.block_size // 2)

    def _load_items(self, load, key) -> tuple[list, list]:
        """(training, held-out) items of ``settings.data`` read by ``load(path, skip_invalid)``:
        ``val_data`` if given, else ``val_fraction`` of the data set aside by the hash of
        ``key(item)`` (:func:`~scratchlm.posttrain.data.split_held_out`)."""
        s = self.settings
        loaded = load(s.data, s.skip_invalid)
        if loaded.skipped:
            self.log(f"skipped {loaded.skipped} invalid line(s) of {s.data}; first: {loaded.errors[0]}")
        if s.val_data:
            return loaded.items, load(s.val_data, s.skip_invalid).items
        return split_held_out(loaded.items, key, s.val_fraction)

    def _refused(self, where: str, error: ValueError) -> None:
        """An item the template refuses (a special token in its text, a character the tokenizer
        lacks): an error naming its file and line, or with ``skip_invalid`` a line in the log."""
        if not self.settings.skip_invalid:
            raise ValueError(f"{where}: {error} (or pass --skip-invalid to skip it)") from None
        self.log(f"skipped {where}: {error}")

    def _load_base_model(self) -> GPT:
        """The base checkpoint's model, grown for the chat tokens, with LoRA adapters if asked."""
        s = self.settings
        model, _ = load_model_from_checkpoint(s.base)
        # New ids get fresh rows: appended, or re-initialised padding rows of a padded table.
        chat.grow_for_chat(model, self.base_tokenizer, self.tokenizer)
        model.train()
        if s.lora_rank:
            if self.cfg.optimizer != "adamw" or self.cfg.strategy == "fsdp" and self.world_size > 1:
                raise ValueError("LoRA fine-tuning supports optimizer = 'adamw' and strategy = 'ddp'")
            first_new = chat.first_new_id(self.base_tokenizer, self.tokenizer)
            new_rows = first_new if first_new < self.tokenizer.vocab_size else None
            if new_rows is not None and self.cfg.weight_decay:
                raise ValueError(
                    "LoRA fine-tuning trains the new chat tokens' embedding rows, and weight decay would "
                    "shrink every other row too: set train.weight_decay = 0"
                )
            apply_lora(
                model, s.lora_rank, s.lora_alpha, s.lora_targets, s.lora_dropout, new_rows_from=new_rows
            )
        return model

    # --- a step -----------------------------------------------------------------------------
    def _count_step_tokens(self, batches: list) -> None:
        """Count the step's target tokens (``batch[2]``, the mask) over every micro-batch and
        rank: each token then weighs the same whatever batch or rank it fell in (a mean per
        micro-batch would weigh a token of a one-token answer like ten tokens of a long one, and
        depend on grad_accum and world size)."""
        total = sum(batch[2].sum() for batch in batches).float()
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
        self._step_tokens = total.clamp_min(1)

    def _per_token_mean(self, total: torch.Tensor) -> torch.Tensor:
        """A micro-batch's summed token loss as its share of the step's per-token mean. The trainer
        divides by grad_accum and DDP averages over ranks: undo both, then divide by the step's tokens."""
        return total * (self.cfg.grad_accum * self.world_size) / self._step_tokens

    # --- resume and checkpoints -------------------------------------------------------------
    def _check_resumable(self) -> dict:
        state = super()._check_resumable()
        if state.get("method", "pretraining") != self.method:
            raise ValueError(
                f"{self.out / 'last'} is a {state.get('method', 'pretraining')} run's checkpoint, not "
                f"{self.method}'s: resume it with its own command, or start a new run"
            )
        recorded = (state.get(self.method) or {}).get("base_sha256")
        if self.settings.lora_rank and recorded and recorded != self.base_sha256:
            raise ValueError(
                f"the base checkpoint {self.settings.base} is not the one this run started from (its "
                "weights' sha256 differs): LoRA adapters only make sense on their own base"
            )
        return state

    def _require_same_base(self, state: dict, why: str = "") -> None:
        """For a method whose reference model is the base (DPO, RL) or that starts from it: refuse
        to resume from another base than the run started with."""
        recorded = (state.get(self.method) or {}).get("base_sha256")
        if recorded and recorded != self.base_sha256:
            raise ValueError(
                f"{self.settings.base} is not the model this {self.method} run started from (its weights' "
                f"sha256 differs): {why}resume with the same --checkpoint"
            )

    def _load_resume_weights(self, folder: Path) -> None:
        if not self.settings.lora_rank:
            return super()._load_resume_weights(folder)
        tensors = load_tensors(folder, "adapters.safetensors")  # the base weights came from settings.base
        modules = lora_modules(self.model)
        start = getattr(self.model, "lora_new_rows_from", None)
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("new_rows."):
                    getattr(self.model, key.split(".", 1)[1]).weight[start:] = value
                    continue
                name, _, which = key.rpartition(".")
                getattr(modules[name], which).copy_(value)

    def _checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The model's weights; under LoRA the adapters merged into the base weights they adapt."""
        weights = super()._checkpoint_weights()
        if not self.settings.lora_rank:
            return weights
        merged = {}
        modules = lora_modules(self.model)
        for key, value in weights.items():
            if ".lora_" in key:
                continue
            name = key.replace(".base.", ".")
            owner = key.rsplit(".base.", 1)[0] if ".base." in key else None
            if owner in modules and key.endswith(".base.weight"):
                value = value + modules[owner].delta().detach().cpu().to(value.dtype)
            merged[name] = value
        return merged

    def _checkpoint_extras(self) -> dict:
        files = {}
        if self.settings.lora_rank:
            files["adapters.safetensors"] = adapter_bytes(
                self.model, base=self.settings.base, base_sha256=self.base_sha256
            )
        return {"tokenizer": self.tokenizer, "files": files}

    def _state_dict(self, rng_by_rank: list[dict]) -> dict:
        return {
            **super()._state_dict(rng_by_rank),
            self.method: {**asdict(self.settings), "base_sha256": self.base_sha256},
            "method": self.method,
        }

    # --- what the log shows -----------------------------------------------------------------
    def sample(self) -> str:
        """The model's greedy reply to the first held-out prompt (rank 0)."""
        if not self.is_main or self.sharded:
            return ""
        messages = self.val_conversations[0]
        prompt = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
        replies = chat.generate_replies(self.model, self.tokenizer, [prompt], self.eval_max_tokens)
        return f"{prompt[-1]['content']!r} -> {replies[0]['text']!r}"
