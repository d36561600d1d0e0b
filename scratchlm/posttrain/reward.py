"""Reward model: a Transformer that reads a conversation and says how good its last reply is.

RLHF's first half (Stiennon et al., 2020; Ouyang et al., 2022). People compare two replies to one
prompt; a model learns a scalar score ``r(x, y)`` such that the preferred reply scores higher.
The Bradley–Terry model says ``P(chosen ≻ rejected) = σ(r(x, y_c) − r(x, y_r))``, and its
negative log-likelihood is the loss::

    loss = −log σ( r(x, y_chosen) − r(x, y_rejected) )

Only the *difference* of two scores is ever trained, so a reward is meaningful relative to another
reply to the same prompt, not on its own (PPO whitens advantages for this reason).

The model is our GPT (usually started from the SFT model, so it already reads the chat format) with
a **scalar head**: a ``Linear(d_model, 1)`` (``score``, as Hugging Face's
``*ForSequenceClassification`` names it) on the final hidden state of the reply's closing
``<|im_end|>`` — the position that has read the whole conversation.

A checkpoint is an ordinary GPT checkpoint (``model.safetensors``: ``sample``, ``export`` and the
engine read it as a language model) plus ``reward_head.safetensors`` with the head;
:func:`load_reward_model` reads both.

    scratchlm reward-model --checkpoint runs/sft/best --data tasks/pairs-train.jsonl --out runs/rm
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.models.checkpoint import (
    load_checkpoint_tokenizer,
    load_model_from_checkpoint,
    load_tensors,
    read_state,
)
from scratchlm.posttrain.base import CHAT_TRAIN_DEFAULTS, ChatConfig, ChatTrainer
from scratchlm.posttrain.pairs import PairBatches, pair_step_lines, prepare_pairs
from scratchlm.tokenizers.chat import ChatTemplate
from scratchlm.train.config import TrainConfig
from scratchlm.train.metrics import Panel
from scratchlm.train.trainer import run_trainer

HEAD_FILE = "reward_head.safetensors"
HEAD_FORMAT = "scratchlm.reward-head"


@dataclass
class RewardConfig(ChatConfig):
    """The reward model's settings: the base checkpoint and pairs, as for DPO."""

    SECTION: ClassVar[str] = "reward_model"
    DATA: ClassVar[str] = "a JSONL file of pairs"


def add_scalar_head(model: nn.Module, name: str = "score", zero: bool = False) -> nn.Linear:
    """A ``Linear(d_model, 1)`` registered on ``model`` as ``name`` (so the optimizer, DDP and the
    checkpoint's extra file all see it). Initialised like a Hugging Face classification head (small
    normal weights), or to zero (a value head that starts by predicting 0)."""
    d = model.config.d_model
    head = nn.Linear(d, 1).to(next(model.parameters()).device)
    with torch.no_grad():
        if zero:
            head.weight.zero_()
        else:
            head.weight.normal_(0.0, 1.0 / (d + 1) ** 0.5)
        head.bias.zero_()
    setattr(model, name, head)
    return head


def collate_full(rows: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Id rows -> (x, last): right-padded ids and each row's last real position."""
    T = max(len(r) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
    last = torch.tensor([len(r) - 1 for r in rows])
    return x.to(device), last.to(device)


def scores(model, head: nn.Module, x: torch.Tensor, last: torch.Tensor, forward=None) -> torch.Tensor:
    """(B,) scalar scores: the head on each row's hidden state at ``last``.

    ``forward`` is the module to call (DDP's or a compiled wrapper, when training); its logits are
    asked for the final position only (``last_only``: the language-model head costs nothing)."""
    _, _, hidden = (forward or model)(x, last_only=True, return_hidden=True)
    picked = hidden[torch.arange(x.shape[0], device=x.device), last]  # (B, C)
    with torch.autocast(x.device.type, enabled=False):  # the head in float32, in training as in scoring
        return head(picked.float())[:, 0]


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Bradley–Terry loss (mean over pairs) and the metrics TRL's RewardTrainer logs."""
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), {
        "accuracy": (margin > 0).float().mean(),
        "margin": margin.mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
    }


def _ends(rows, end_id: int) -> list[list[int]]:
    """A rendered reply's ids up to its closing ``<|im_end|>``: what the reward model reads (the
    newline after it carries nothing)."""
    out = []
    for ids, _ in rows:
        end = len(ids) - 1 - ids[::-1].index(end_id)
        out.append(ids[: end + 1])
    return out


class RewardTrainer(ChatTrainer):
    """Pairs in, a scalar head out. The data side (loading, rendering, the held-out split) is
    DPO's too (:mod:`scratchlm.posttrain.pairs`); the model gets a head and the loss is Bradley–Terry's."""

    method = "reward_model"
    plot_panels = (
        Panel("Bradley-Terry loss", (("loss", "train"), ("val_loss", "held out")), "loss"),
        Panel("fraction of pairs", (("val_accuracy", "chosen scores higher, held out"),), "accuracy"),
    )

    def _prepare_data(self, model_section: dict) -> None:
        self._prepare_tokenizer()
        self.train_rows, self.val_rows, self.val_conversations = prepare_pairs(self)

    def _initial_model(self):
        if self.settings.lora_rank:
            raise ValueError("a reward model trains its whole network and head (lora_rank must be 0)")
        model = self._load_base_model().to(self.device)  # the base (grown for the chat tokens)
        if not model.config.tie_embeddings:
            # The language-model head does not take part in a score: frozen, it is not a parameter
            # DDP would wait for a gradient of.
            model.lm_head.weight.requires_grad_(False)
        # Bradley–Terry sees only differences of two scores: a bias cancels, its gradient is exactly
        # 0, and Adam would turn that 0's rounding noise into steps of size lr. It stays at 0, frozen.
        add_scalar_head(model).bias.requires_grad_(False)
        end = self.template.end_id
        self.train_ends = [_ends(r, end) for r in self.train_rows]
        self.val_ends = [_ends(r, end) for r in self.val_rows]
        pairs, pad = self.train_ends, self.template.pad_id

        def batch(index: list[int]):  # (x, last) of the chosen rows, then the rejected
            mine = [pairs[i] for i in index]
            return collate_full([c for c, _ in mine] + [r for _, r in mine], pad, self.device)

        self.train_loader = PairBatches(
            len(pairs), self.cfg.batch_size, self.cfg.seed, batch, self.rank, self.world_size
        )
        return model

    def _check_resumable(self) -> dict:
        state = super()._check_resumable()
        self._require_same_base(state)
        return state

    def _step_lines(self) -> list[str]:
        return pair_step_lines(self)

    def _fsdp_units(self) -> list[nn.Module]:
        # The head runs after the model's forward (on the hidden states it returns): sharded as a
        # unit of its own, it gathers its weights when called and reduces its gradients itself.
        return [self.model.score]

    def _loss(self, batch) -> torch.Tensor:
        x, last = batch
        r = scores(self.model, self.model.score, x, last, forward=self.step_model)
        B = x.shape[0] // 2
        loss, self.step_extras = reward_loss(r[:B], r[B:])
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """The loss on the held-out pairs; ``val_accuracy`` is how often the chosen reply scores higher."""
        self.model.eval()
        chosen, rejected = self._scores_of(self.val_ends)
        loss, metrics = reward_loss(chosen, rejected)
        self.model.train()
        values = self._shared([loss.item(), *(v.item() for v in metrics.values())], op="rank0")
        self.eval_extras = {f"val_{k}": v for k, v in zip(metrics, values[1:])}
        return values[0]

    def _scores_of(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for start in range(0, len(pairs), self.cfg.batch_size):
            chunk = pairs[start : start + self.cfg.batch_size]
            x, last = collate_full(
                [c for c, _ in chunk] + [r for _, r in chunk], self.template.pad_id, self.device
            )
            with self.autocast:
                r = scores(self.model, self.model.score, x, last)
            out.append(torch.stack([r[: len(chunk)], r[len(chunk) :]], dim=1))
        both = torch.cat(out).cpu()
        return both[:, 0], both[:, 1]

    def sample(self) -> str:
        return ""  # a reward model's language-model head is not what it trains

    # The head travels in its own file: model.safetensors stays an ordinary GPT's.
    def _checkpoint_weights(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in super()._checkpoint_weights().items() if not k.startswith("score.")}

    def _checkpoint_extras(self) -> dict:
        from safetensors.torch import save

        extras = super()._checkpoint_extras()
        extras["files"][HEAD_FILE] = save(
            head_state(self.model.score), metadata={"format": HEAD_FORMAT, "version": "1"}
        )
        return extras

    def _load_resume_weights(self, folder: Path) -> None:
        _load_with_head(folder, self.model, "score")

    def _resume(self, state: dict) -> None:
        # A checkpoint written before the head's bias was frozen holds the bias's optimizer state:
        # it is dropped (FSDP would skip it silently, one process would refuse the checkpoint), and
        # the bias keeps the value its head file holds, frozen from now on.
        legacy = [
            meta
            for meta in state["optimizers"]
            if any("score.bias" in g["params"] for g in meta["param_groups"])
        ]
        for meta in legacy:
            meta["dropped"] = [*meta.get("dropped", []), "score.bias"]
        if legacy:
            bias = head_state(self.model.score)["bias"].item()  # every rank (a gather under FSDP)
            if self.is_main:
                self.log(
                    f"{self.out / 'last'} was saved while the reward head's bias was still trained: its optimizer "
                    f"state is dropped, and the bias stays frozen at its saved value {bias:g}"
                )
        super()._resume(state)


def head_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """A head's whole weights as float32 CPU tensors. Under FSDP its parameters are shards
    (DTensors): each is gathered (``full_tensor()``, a collective: every rank calls this)."""
    out = {}
    for k, v in head.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu().float().contiguous()
    return out


def _load_with_head(
    folder: Path, model: nn.Module, name: str, file: str = HEAD_FILE, fmt: str = HEAD_FORMAT
) -> None:
    """Load a GPT's weights and a head saved beside them (``file``) into ``model.<name>``."""
    from scratchlm.models.checkpoint import load_weights

    head = getattr(model, name)
    delattr(model, name)  # load_weights checks the GPT's keys exactly
    try:
        load_weights(folder, model)
    finally:
        setattr(model, name, head)
    load_head(folder, head, file, fmt)


def load_head(folder: Path, head: nn.Linear, file: str = HEAD_FILE, fmt: str = HEAD_FORMAT) -> None:
    """A scalar head's weights from ``folder / file``, checked: its format and its shapes."""
    from safetensors import safe_open

    from scratchlm.models.checkpoint import FormatError

    tensors = load_tensors(folder, file)  # sha256 checked against the checkpoint's state.json
    with safe_open(str(folder / file), "pt") as f:
        found = (f.metadata() or {}).get("format")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    expected = {"weight": tuple(head.weight.shape), "bias": tuple(head.bias.shape)}
    if found != fmt or shapes != expected:
        raise FormatError(
            f"{folder / file}: not a {fmt} file for this model (format {found!r}, tensors {shapes}; "
            f"expected {expected})"
        )
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])


class RewardModel:
    """A trained reward model, ready to score replies: ``rm([prompt, ...], [reply, ...])`` -> (N,).

    ``prompt`` is a list of messages (ending with the user's), ``reply`` the assistant's text.
    Also a plain ``(prompt, reply) -> float`` callable through :meth:`score_one`, the shape the
    critique-revise loop's critic takes."""

    def __init__(self, model, tokenizer, device="cpu", batch_size: int = 32):
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.template = ChatTemplate(tokenizer)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], replies: list[str]) -> torch.Tensor:
        rows = []
        for prompt, reply in zip(prompts, replies, strict=True):
            r = self.template.render(prompt + [{"role": "assistant", "content": reply}])
            rows.append(r)
        return self.score_ids([_ends([(r.ids, r.mask)], self.template.end_id)[0] for r in rows])

    @torch.no_grad()
    def score_ids(self, rows: list[list[int]]) -> torch.Tensor:
        """Scores of rendered conversations, each ending with the reply's ``<|im_end|>``."""
        context = self.model.config.block_size
        too_long = [len(r) for r in rows if len(r) > context]
        if too_long:
            raise ValueError(
                f"a conversation of {too_long[0]} tokens does not fit the reward model's context ({context})"
            )
        out = []
        for start in range(0, len(rows), self.batch_size):
            x, last = collate_full(rows[start : start + self.batch_size], self.template.pad_id, self.device)
            out.append(scores(self.model, self.model.score, x, last).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score_one(self, prompt: list[dict], reply: str) -> float:
        return float(self([prompt], [reply])[0])


def load_reward_model(path: str | Path, device="cpu") -> RewardModel:
    """A reward-model checkpoint (``scratchlm reward-model``'s ``best`` or ``last``) -> :class:`RewardModel`."""
    folder = Path(path).resolve()
    state = read_state(folder)
    if state.get("method") != "reward_model" or not (folder / HEAD_FILE).exists():
        raise ValueError(
            f"{folder} is not a reward model checkpoint (method {state.get('method', 'pretraining')!r}, "
            f"no {HEAD_FILE}): train one with `scratchlm reward-model`"
        )
    model, state = load_model_from_checkpoint(folder)
    load_head(folder, add_scalar_head(model))
    return RewardModel(model, load_checkpoint_tokenizer(folder, state), device)


def train_reward_model(
    rm_config: dict,
    train_config: dict,
    *,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train a reward model on ``rm_config["data"]`` (pairs) from ``rm_config["base"]`` (an SFT model)."""
    rcfg = RewardConfig.from_dict(rm_config)
    cfg = TrainConfig.from_dict(
        train_config, defaults={**CHAT_TRAIN_DEFAULTS, "lr": 1e-4, "warmup_steps": 10, "sample_tokens": 0}
    )
    return run_trainer(
        lambda: RewardTrainer(rcfg, cfg, resume=resume, progress=progress, overwrite=overwrite)
    )
