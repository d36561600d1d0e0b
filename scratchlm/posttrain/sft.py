"""Supervised fine-tuning: a base model learns the chat format from example conversations.

SFT is next-token training with two differences, everything else is the trainer's (checkpoints
and exact resume, DDP, metrics JSONL, the loss plot, early stopping):

1. **The data are conversations**, rendered with the chat template (:mod:`scratchlm.tokenizers.chat`)
   one per row and right-padded to the longest in the batch. Causal attention never looks right,
   so padding changes nothing for the real tokens.
2. **The loss is masked**: only the assistant's tokens and the ``<|im_end|>`` closing each of its
   turns are targets (``masked_token_loss``). The model is not taught to write the user's part.

The base model gets the chat special tokens (new rows, see ``GPT.grow_vocab``) and is trained
fully or through **LoRA** adapters (``lora_rank > 0``, :mod:`scratchlm.posttrain.lora`): then only
the adapters train; checkpoints hold the *merged* weights (any reader — the engine, ``sample``,
``export`` — sees an ordinary model) plus ``adapters.safetensors`` (small; resuming restores the
base from the base checkpoint and the adapters from there).

    scratchlm sft --checkpoint runs/base/best --data tasks/sft-train.jsonl --out runs/sft [--lora-rank 8]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from scratchlm.config import ConfigError, Rule, validate
from scratchlm.models.checkpoint import (load_checkpoint_tokenizer, load_model_from_checkpoint, load_tensors,
                                         read_state)
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.loss import masked_token_loss, masked_token_loss_sum
from scratchlm.posttrain.data import load_sft
from scratchlm.posttrain.lora import DEFAULT_TARGETS, adapter_bytes, apply_lora, lora_modules
from scratchlm.tokenizers.chat import ChatTemplate, add_chat_tokens
from scratchlm.train.config import TrainConfig
from scratchlm.train.trainer import Trainer, run_trainer

_RULES = {"lora_rank": Rule(min=0, why="0 = full fine-tuning"), "lora_alpha": Rule(above=0),
          "lora_dropout": Rule(min=0, below=1), "val_fraction": Rule(min=0, below=1), "eval_max_tokens": Rule(min=1)}


@dataclass
class SFTConfig:
    base: str = ""  # the pretrained checkpoint folder (resolved once: a moving `best` link cannot change it)
    tokenizer: str | None = None  # the base's tokenizer (a JSON file or gpt2), for an imported base
    data: str = ""  # SFT JSONL (chat, Alpaca or prompt/completion lines)
    val_data: str | None = None  # held-out JSONL; default: val_fraction of data, set aside by hash
    val_fraction: float = 0.05
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    skip_invalid: bool = False
    eval_max_tokens: int = 32  # reply length at most, for the exact-match evaluation
    learn_end_of_turn: bool = True  # False: leave <|im_end|> out of the mask (the classic bug, for the docs' demo)
    packing: bool = False  # several conversations per row, attention kept within each (SFT only)

    # Each method's config extends this one: its [section] name, its rules, and what its data is.
    SECTION: ClassVar[str] = "sft"
    RULES: ClassVar[dict] = _RULES
    DATA: ClassVar[str] = "a JSONL file of conversations"

    def __post_init__(self):
        validate(self, self.SECTION, self.RULES)
        if not self.base or not self.data:
            raise ConfigError(f"{self.SECTION}.base (a checkpoint) and {self.SECTION}.data ({self.DATA}) are required")

    @classmethod
    def from_dict(cls, d: dict):
        from scratchlm.config import dataclass_from_dict

        return dataclass_from_dict(cls, d, cls.SECTION)


class ConversationBatches:
    """Random batches of rendered conversations: ``(x, y, mask)`` of shape (B, T), right-padded.

    ``x`` are the inputs, ``y`` the next tokens (``-1`` at padding), ``mask`` 1 where ``y`` is an
    assistant token to learn. Sampling with replacement from a ``torch.Generator``, like the
    pretraining loader, so a checkpoint's copy of the generator state makes resume exact; with
    several processes each takes its own slice of one global draw.

    With ``pack`` (the context length) each row holds as many drawn conversations as fit in
    ``pack`` positions, one after another, and the batch gains a fourth tensor, ``documents``:
    which conversation each position belongs to (the model keeps attention within it and restarts
    positions at each). Short conversations then fill the windows instead of padding."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int,
                 device, rank: int = 0, world_size: int = 1, pack: int | None = None):
        if not rows:
            raise ValueError("no conversations to train on")
        self.rows, self.batch_size, self.pad_id, self.pack = rows, batch_size, pad_id, pack
        self.device, self.rank, self.world_size = device, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def get_batch(self):
        if self.pack:
            packed = self._pack(self.batch_size * self.world_size)
            return collate_packed(packed[self.rank * self.batch_size : (self.rank + 1) * self.batch_size],
                                  self.pad_id, self.device)
        picks = torch.randint(len(self.rows), (self.batch_size * self.world_size,), generator=self.generator)
        mine = picks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
        return collate([self.rows[i] for i in mine], self.pad_id, self.device)

    def _pack(self, n_rows: int) -> list[list[tuple[list[int], list[int]]]]:
        """``n_rows`` rows of conversations drawn in turn: each joins the current row if it fits
        (a conversation of n ids fills n - 1 positions), else starts the next one. The draw that
        overflows the last row is not used."""
        rows, current, used = [], [], 0
        while True:
            conversation = self.rows[int(torch.randint(len(self.rows), (1,), generator=self.generator))]
            n = len(conversation[0]) - 1
            if current and used + n > self.pack:
                rows.append(current)
                if len(rows) == n_rows:
                    return rows
                current, used = [], 0
            current.append(conversation)
            used += n


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


def collate_packed(rows: list[list[tuple[list[int], list[int]]]], pad_id: int, device="cpu"):
    """Rows of several conversations each -> x, y, mask and documents (B, T). Each conversation
    gives its own shifted (inputs, targets, mask), so no target crosses into the next one;
    padding is a document of its own (-1)."""
    pieces = []
    for row in rows:
        x, y, m, d = [], [], [], []
        for j, (ids, mask) in enumerate(row):
            x += ids[:-1]
            y += ids[1:]
            m += mask[1:]
            d += [j] * (len(ids) - 1)
        pieces.append((x, y, m, d))
    T = max(len(x) for x, _, _, _ in pieces)
    out_x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    out_y = torch.full((len(rows), T), -1, dtype=torch.long)
    out_m = torch.zeros((len(rows), T))
    out_d = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (x, y, m, d) in enumerate(pieces):
        out_x[i, : len(x)], out_y[i, : len(y)] = torch.tensor(x), torch.tensor(y)
        out_m[i, : len(m)], out_d[i, : len(d)] = torch.tensor(m, dtype=torch.float32), torch.tensor(d)
    return out_x.to(device), out_y.to(device), out_m.to(device), out_d.to(device)


def render_all(conversations: list[list[dict]], template: ChatTemplate, context: int, skip_invalid: bool = False,
               log=None) -> tuple[list, int]:
    """Rendered (ids, mask) rows that fit the context (+1: the last token is only a target), and
    how many were too long (dropped: a cut conversation would teach replies that stop mid-way).
    A conversation the template refuses (a special token in its text, a character the tokenizer
    does not know) raises, naming its file and line, or is skipped with ``skip_invalid``."""
    rows, dropped = [], 0
    for messages in conversations:
        try:
            r = template.render(messages)
        except ValueError as e:
            where = getattr(messages, "where", "a conversation")
            if not skip_invalid:
                raise ValueError(f"{where}: {e} (or pass --skip-invalid to skip it)") from None
            if log:
                log(f"skipped {where}: {e}")
            continue
        if len(r.ids) > context + 1:
            dropped += 1
            continue
        rows.append((r.ids, r.mask))
    return rows, dropped


def split_held_out(items: list, key, fraction: float) -> tuple[list, list]:
    """(train, held out): ``fraction`` of ``items`` set aside by the hash of ``key(item)``, the same
    way in every run (conversations by their stripped text, DPO pairs by their prompt)."""
    out = [_held_out(key(item), fraction) for item in items]
    return [i for i, o in zip(items, out) if not o], [i for i, o in zip(items, out) if o]


def _held_out(messages: list[dict], fraction: float) -> bool:
    import hashlib

    key = repr([(m["role"], m["content"].strip()) for m in messages]).encode()  # as rendered
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 10_000 < fraction * 10_000


class SFTTrainer(Trainer):
    method = "sft"  # what a checkpoint records (state["method"], and its settings under that key)
    model_adds_auxiliary = False  # the loss is built from logits: the loop adds the blocks' auxiliary losses

    def __init__(self, sft: SFTConfig, cfg: TrainConfig, **kwargs):
        self.sft = sft
        sft.base = str(Path(sft.base).resolve())  # `runs/base/best` -> the step folder it names now
        cfg.data = sft.data
        super().__init__({}, cfg, **kwargs)

    # --- the hooks of Trainer ---------------------------------------------------------------
    def _prepare_tokenizer(self) -> None:
        """The base checkpoint's tokenizer with the chat tokens, the template, the grown model config."""
        sft = self.sft
        state = read_state(sft.base)
        self.base_sha256 = (state.get("files") or {}).get("model.safetensors", {}).get("sha256")
        base_tokenizer = load_checkpoint_tokenizer(sft.base, state, sft.tokenizer)
        self.known_ids = base_tokenizer.vocab_size  # ids that meant something before the chat tokens
        self.tokenizer = add_chat_tokens(base_tokenizer)
        self.template = ChatTemplate(self.tokenizer, learn_end_of_turn=sft.learn_end_of_turn)
        self.model_config = GPTConfig.from_dict({**state["model"], "vocab_size": max(state["model"]["vocab_size"],
                                                                                     self.tokenizer.vocab_size)})
        self.eval_max_tokens = min(sft.eval_max_tokens, self.model_config.block_size // 2)

    def _prepare_data(self, model_section: dict) -> None:
        sft, cfg = self.sft, self.cfg
        self._prepare_tokenizer()
        loaded = load_sft(sft.data, sft.skip_invalid)
        if loaded.skipped:
            self.log(f"skipped {loaded.skipped} invalid line(s) of {sft.data}; first: {loaded.errors[0]}")
        if sft.val_data:
            train, val = loaded.items, load_sft(sft.val_data, sft.skip_invalid).items
        else:
            train, val = split_held_out(loaded.items, lambda c: c, sft.val_fraction)
        context = self.model_config.block_size
        rows, dropped = render_all(train, self.template, context, sft.skip_invalid, self.log)
        if dropped:
            self.log(f"dropped {dropped} of {len(train)} training conversations longer than the context ({context})")
        self.val_conversations = val[: cfg.eval_windows]
        self.val_rows, _ = render_all(self.val_conversations, self.template, context, sft.skip_invalid, self.log)
        if not self.val_rows:
            raise ValueError(f"no held-out conversation fits the context: give sft.val_data, or raise sft.val_fraction "
                             f"(now {sft.val_fraction})")
        self.train_loader = ConversationBatches(rows, cfg.batch_size, self.template.pad_id, cfg.seed, self.device,
                                                self.rank, self.world_size, pack=context if sft.packing else None)

    def _initial_model(self) -> GPT:
        sft = self.sft
        model, _ = load_model_from_checkpoint(sft.base)
        # New ids get fresh rows: appended, or re-initialised padding rows of a padded table.
        model.grow_vocab(self.model_config.vocab_size, known=min(self.known_ids, model.config.vocab_size))
        model.train()
        if sft.lora_rank:
            if self.cfg.optimizer != "adamw" or self.cfg.strategy == "fsdp" and self.world_size > 1:
                raise ValueError("LoRA fine-tuning supports optimizer = 'adamw' and strategy = 'ddp'")
            new_rows = self.known_ids if self.known_ids < self.tokenizer.vocab_size else None
            if new_rows is not None and self.cfg.weight_decay:
                raise ValueError("LoRA fine-tuning trains the new chat tokens' embedding rows, and weight decay would "
                                 "shrink every other row too: set train.weight_decay = 0")
            apply_lora(model, sft.lora_rank, sft.lora_alpha, sft.lora_targets, sft.lora_dropout, new_rows_from=new_rows)
        return model

    def _check_resumable(self) -> dict:
        state = super()._check_resumable()
        if state.get("method", "pretraining") != self.method:
            raise ValueError(f"{self.out / 'last'} is a {state.get('method', 'pretraining')} run's checkpoint, not "
                             f"{self.method}'s: resume it with its own command, or start a new run")
        recorded = (state.get(self.method) or {}).get("base_sha256")
        if self.sft.lora_rank and recorded and recorded != self.base_sha256:
            raise ValueError(f"the base checkpoint {self.sft.base} is not the one this run started from (its weights' "
                             "sha256 differs): LoRA adapters only make sense on their own base")
        return state

    def _load_resume_weights(self, folder: Path) -> None:
        if not self.sft.lora_rank:
            return super()._load_resume_weights(folder)
        tensors = load_tensors(folder, "adapters.safetensors")  # the base weights came from sft.base
        modules = lora_modules(self.model)
        start = getattr(self.model, "lora_new_rows_from", None)
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("new_rows."):
                    getattr(self.model, key.split(".", 1)[1]).weight[start:] = value
                    continue
                name, _, which = key.rpartition(".")
                getattr(modules[name], which).copy_(value)

    def _begin_step(self, batches: list) -> None:
        """Count the step's assistant tokens over every micro-batch and rank: each token then weighs
        the same whatever batch or rank it fell in (a mean per micro-batch would weigh a token of a
        one-token answer like ten tokens of a long one, and depend on grad_accum and world size)."""
        total = sum(batch[2].sum() for batch in batches).float()  # (x, y, mask[, documents])
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
        self._step_tokens = total.clamp_min(1)

    def _loss(self, batch) -> torch.Tensor:
        x, y, mask, *documents = batch
        logits, _ = self.step_model(x, documents=documents[0] if documents else None)
        total, _ = masked_token_loss_sum(logits, y, mask)
        # The trainer divides by grad_accum and DDP averages over ranks: undo both, then take the
        # mean over the step's tokens.
        return total * (self.cfg.grad_accum * self.world_size) / self._step_tokens

    def _checkpoint_weights(self) -> dict[str, torch.Tensor]:
        weights = super()._checkpoint_weights()
        if not self.sft.lora_rank:
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
        if self.sft.lora_rank:
            files["adapters.safetensors"] = adapter_bytes(self.model, base=self.sft.base, base_sha256=self.base_sha256)
        return {"tokenizer": self.tokenizer, "files": files}

    def _state_dict(self, rng_by_rank: list[dict]) -> dict:
        return {**super()._state_dict(rng_by_rank), self.method: {**asdict(self.sft), "base_sha256": self.base_sha256},
                "method": self.method}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Masked loss on the held-out conversations (rank 0's value on every rank)."""
        self.model.eval()
        total, count = 0.0, 0.0
        for start in range(0, len(self.val_rows), self.cfg.batch_size):
            x, y, mask = collate(self.val_rows[start : start + self.cfg.batch_size], self.template.pad_id, self.device)
            with self.autocast:
                logits, _ = self.model(x)
            loss, n = masked_token_loss(logits, y, mask)
            total += loss.item() * n.item()
            count += n.item()
        self.model.train()
        return self._shared([total / max(count, 1)], op="rank0")[0]

    def sample(self) -> str:
        """The model's greedy reply to the first held-out prompt (rank 0)."""
        if not self.is_main or self.sharded:
            return ""
        messages = self.val_conversations[0]
        prompt = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
        replies = generate_replies(self.model, self.tokenizer, [prompt], self.eval_max_tokens)
        return f"{prompt[-1]['content']!r} -> {replies[0]['text']!r}"


def load_chat_model(path: str | Path, tokenizer_spec: str | None = None, device=None):
    """(model, chat tokenizer) of a checkpoint, in eval mode; a base checkpoint without the chat
    tokens gets them, with fresh embedding rows, as SFT would start it."""
    from scratchlm.device import pick_device
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint
    from scratchlm.tokenizers.chat import add_chat_tokens

    model, state = load_model_from_checkpoint(path, pick_device(device))
    plain = load_checkpoint_tokenizer(path, state, tokenizer_spec)
    tokenizer = add_chat_tokens(plain)
    model.grow_vocab(max(model.config.vocab_size, tokenizer.vocab_size), known=min(plain.vocab_size, model.config.vocab_size))
    return model.eval(), tokenizer


def generate_replies(model, tokenizer, prompts: list[list[dict]], max_tokens: int = 32, *, temperature: float = 0.0,
                     seeds: list[int] | None = None, progress: bool = False, **engine_options) -> list[dict]:
    """Assistant replies, batched through the inference engine — greedy by default, or sampled at
    ``temperature`` with one seed per prompt (a seeded request draws the same tokens alone or in
    any batch, so a run is reproducible). Each reply: ``text``, whether it ended with
    ``<|im_end|>`` (``ended``) rather than running out of tokens, and the ids (``prompt_ids``,
    ``token_ids``). A reply the engine could not finish raises (a training loop must not learn
    from half an answer)."""
    from scratchlm.serve import LLM, SamplingParams

    if not prompts:
        return []
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    template = ChatTemplate(tokenizer)
    was_training = model.training
    context = model.config.block_size
    if not 0 < max_tokens < context:
        raise ValueError(f"max_tokens must be in (0, {context}) for this model's context, got {max_tokens}")
    ids = [template.prompt_ids(p)[-(context - max_tokens):] for p in prompts]
    # Only <|im_end|> ends a reply (ignore_eos: a stop on <|endoftext|> must not count as one).
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, stop_token_ids=[template.end_id],
                             ignore_eos=True, seed=None if seeds is None else seeds[i]) for i in range(len(ids))]
    seqs = min(len(ids), 64)  # a KV pool for this batch, not for 64 full contexts on a training GPU
    options = {"max_num_seqs": seqs, "num_blocks": seqs * -(-context // 16), **engine_options}
    try:
        outs = LLM(model, tokenizer, weight_format="dense", **options).generate(ids, params, progress=progress)
    finally:
        model.train(was_training)
    failed = [o for o in outs if o.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"the engine could not finish a reply: {failed[0].error}")
    return [{"text": o.text, "ended": bool(o.token_ids) and o.token_ids[-1] == template.end_id,
             "prompt_ids": o.prompt_token_ids, "token_ids": o.token_ids} for o in outs]


def exact_match(model, tokenizer, prompts, max_tokens: int = 32) -> dict:
    """Fraction of :class:`~scratchlm.posttrain.data.PromptWithAnswer` answered exactly, and the
    fraction of replies that end with the end-of-turn token."""
    replies = generate_replies(model, tokenizer, [p.prompt for p in prompts], max_tokens)
    correct = [p.reward(r["text"]) for p, r in zip(prompts, replies)]
    return {"exact_match": sum(correct) / len(prompts), "ended_with_end_of_turn": sum(r["ended"] for r in replies) /
            len(prompts), "n": len(prompts)}


def exact_match_before_after(base: str | Path, tuned: str | Path, prompts_path: str | Path,
                             base_tokenizer: str | None = None) -> dict:
    """Exact match of the base and the fine-tuned checkpoint on the same held-out prompts (greedy)."""
    from scratchlm.posttrain.data import load_prompts

    prompts = load_prompts(prompts_path).items
    out = {}
    for name, path in (("before", base), ("after", tuned)):
        # the base gets fresh rows for the chat tokens (as the fine-tuning started from)
        model, tokenizer = load_chat_model(path, base_tokenizer if name == "before" else None, device="cpu")
        out[name] = exact_match(model, tokenizer, prompts)
    return out


def sft(sft_config: dict, train_config: dict, *, resume: bool = False, progress: bool = True,
        overwrite: bool = False) -> dict:
    """Fine-tune ``sft_config["base"]`` on ``sft_config["data"]``; returns the trainer's summary."""
    scfg = SFTConfig.from_dict(sft_config)
    cfg = TrainConfig.from_dict({**SFT_TRAIN_DEFAULTS, "lr": 3e-4 if not scfg.lora_rank else 2e-3, **train_config})
    return run_trainer(lambda: SFTTrainer(scfg, cfg, resume=resume, progress=progress, overwrite=overwrite))


# The [train] defaults for fine-tuning where they differ from pretraining's: a short warmup, decay
# to 0, no weight decay (it would pull the pretrained weights towards 0), up to 64 held-out
# conversations, and a sample reply at each evaluation (sample_tokens > 0 turns it on).
SFT_TRAIN_DEFAULTS = {"warmup_steps": 20, "min_lr": 0.0, "weight_decay": 0.0, "eval_windows": 64, "sample_tokens": 1,
                      "max_steps": 500, "eval_interval": 100, "batch_size": 16}
