"""Supervised fine-tuning: a base model learns the chat format from example conversations.

SFT is next-token training with two differences, everything else is the trainer's (checkpoints
and exact resume, DDP, metrics JSONL, the loss plot, early stopping):

1. **The data are conversations**, rendered with the chat template (:mod:`scratchlm.tokenizers.chat`)
   one per row and right-padded to the longest in the batch. Causal attention never looks right,
   so padding changes nothing for the real tokens.
2. **The loss is masked**: only the assistant's tokens and the ``<|im_end|>`` closing each of its
   turns are targets (``masked_token_loss``). The model is not taught to write the user's part.

With ``packing`` several conversations share a row, attention kept within each (SFT's own
setting). What every post-training method shares — the base model grown for the chat tokens,
**LoRA** (``lora_rank > 0``: checkpoints hold the merged weights plus ``adapters.safetensors``),
the settings' record in each checkpoint — is the chat trainer's (:mod:`scratchlm.posttrain.base`).

    scratchlm sft --checkpoint runs/base/best --data tasks/sft-train.jsonl --out runs/sft [--lora-rank 8]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scratchlm.models.gpt import GPT
from scratchlm.models.loss import masked_token_loss, masked_token_loss_sum
from scratchlm.posttrain.base import CHAT_TRAIN_DEFAULTS, ChatConfig, ChatTrainer, collate
from scratchlm.posttrain.data import load_sft
from scratchlm.tokenizers.chat import ChatTemplate
from scratchlm.train.config import TrainConfig
from scratchlm.train.metrics import Panel
from scratchlm.train.trainer import run_trainer


@dataclass
class SFTConfig(ChatConfig):
    """The ``[sft]`` settings: those of every chat trainer (:class:`~scratchlm.posttrain.base.ChatConfig`);
    ``packing`` is SFT's own."""

    SECTION: ClassVar[str] = "sft"
    DATA: ClassVar[str] = "a JSONL file of conversations"


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

    def __init__(
        self,
        rows: list[tuple[list[int], list[int]]],
        batch_size: int,
        pad_id: int,
        seed: int,
        device,
        rank: int = 0,
        world_size: int = 1,
        pack: int | None = None,
    ):
        if not rows:
            raise ValueError("no conversations to train on")
        self.rows, self.batch_size, self.pad_id, self.pack = rows, batch_size, pad_id, pack
        self.device, self.rank, self.world_size = device, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def get_batch(self):
        if self.pack:
            packed = self._pack(self.batch_size * self.world_size)
            return collate_packed(
                packed[self.rank * self.batch_size : (self.rank + 1) * self.batch_size],
                self.pad_id,
                self.device,
            )
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


def render_all(
    conversations: list[list[dict]],
    template: ChatTemplate,
    context: int,
    skip_invalid: bool = False,
    log=None,
) -> tuple[list, int]:
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


class SFTTrainer(ChatTrainer):
    """Masked next-token training on conversations."""

    method = "sft"
    plot_panels = (
        Panel("cross-entropy on the replies (nats/token)", (("loss", "train"), ("val_loss", "held out"))),
    )

    def _prepare_data(self, model_section: dict) -> None:
        s, cfg = self.settings, self.cfg
        self._prepare_tokenizer()
        train, val = self._load_items(load_sft, lambda conversation: conversation)
        context = self.model_config.block_size
        rows, dropped = render_all(train, self.template, context, s.skip_invalid, self.log)
        if dropped:
            self.log(
                f"dropped {dropped} of {len(train)} training conversations longer than the context ({context})"
            )
        self.val_conversations = val[: cfg.eval_windows]
        self.val_rows, _ = render_all(
            self.val_conversations, self.template, context, s.skip_invalid, self.log
        )
        if not self.val_rows:
            raise ValueError(
                f"no held-out conversation fits the context: give sft.val_data, or raise sft.val_fraction "
                f"(now {s.val_fraction})"
            )
        self.train_loader = ConversationBatches(
            rows,
            cfg.batch_size,
            self.template.pad_id,
            cfg.seed,
            self.device,
            self.rank,
            self.world_size,
            pack=context if s.packing else None,
        )

    def _initial_model(self) -> GPT:
        return self._load_base_model()

    def _step_lines(self) -> list[str]:
        B, T = self.cfg.batch_size, self.model_config.block_size
        rows = "rows of packed conversations" if self.settings.packing else "conversations"
        return [
            f"tokens per step: up to {self._per_step(B * T):,} = {B} {rows} x up to {T} tokens (padded to the "
            f"longest){self._per_step_factors()}"
        ]

    def _begin_step(self, batches: list) -> None:
        self._count_step_tokens(batches)  # (x, y, mask[, documents]): each assistant token weighs the same

    def _loss(self, batch) -> torch.Tensor:
        x, y, mask, *documents = batch
        logits, _ = self.step_model(x, documents=documents[0] if documents else None)
        total, _ = masked_token_loss_sum(logits, y, mask)
        return self._per_token_mean(total)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Masked loss on the held-out conversations (rank 0's value on every rank)."""
        self.model.eval()
        total, count = 0.0, 0.0
        for start in range(0, len(self.val_rows), self.cfg.batch_size):
            x, y, mask = collate(
                self.val_rows[start : start + self.cfg.batch_size], self.template.pad_id, self.device
            )
            with self.autocast:
                logits, _ = self.model(x)
            loss, n = masked_token_loss(logits, y, mask)
            total += loss.item() * n.item()
            count += n.item()
        self.model.train()
        return self._shared([total / max(count, 1)], op="rank0")[0]


def sft(
    sft_config: dict,
    train_config: dict,
    *,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Fine-tune ``sft_config["base"]`` on ``sft_config["data"]``; returns the trainer's summary."""
    scfg = SFTConfig.from_dict(sft_config)
    cfg = TrainConfig.from_dict(
        train_config, defaults={**CHAT_TRAIN_DEFAULTS, "lr": 3e-4 if not scfg.lora_rank else 2e-3}
    )
    return run_trainer(lambda: SFTTrainer(scfg, cfg, resume=resume, progress=progress, overwrite=overwrite))
