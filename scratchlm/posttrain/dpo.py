"""Direct Preference Optimization (Rafailov et al., 2023): learn from pairs (chosen ≻ rejected)
without a reward model and without sampling.

RLHF maximises ``E[r(x, y)] − β·KL(π ‖ π_ref)``. Its optimum has a closed form,
``π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β)``, so a reward can be written through the policy itself:
``r(x, y) = β·log(π(y|x) / π_ref(y|x)) + β·log Z(x)``. Put that into the Bradley–Terry model of
preferences, ``P(c ≻ r) = σ(r(x, c) − r(x, r))``, and ``Z(x)`` cancels::

    loss = −log σ( β·[ (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)) ] )

with ``log π(y)`` the *summed* log-probability of the reply's tokens (and its end of turn) given
the prompt. The reference ``π_ref`` is the model before training, frozen: its log-probabilities
are computed once, before the first step, and never change. At the first step the policy is
the reference, the bracket is 0, and the loss is ``log 2`` (checked by a test).

Metrics are named as TRL names them: ``rewards/chosen`` = β·(log π(c) − log π_ref(c)),
``rewards/rejected``, ``rewards/margins`` (their difference) and ``rewards/accuracies`` (how
often the chosen reply's implicit reward is the larger: relative to the reference, so 0 at the
start). Evaluations also log ``preference_accuracy``, absolute: how often the model itself finds
the chosen reply likelier (and the reference's, for comparison).

    scratchlm dpo --checkpoint runs/sft/best --data tasks/pairs-train.jsonl --out runs/dpo [--beta 0.1]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from scratchlm.config import Rule
from scratchlm.posttrain.base import CHAT_RULES, CHAT_TRAIN_DEFAULTS, ChatConfig, ChatTrainer, collate
from scratchlm.posttrain.pairs import PairBatches, pair_step_lines, prepare_pairs
from scratchlm.train.config import TrainConfig
from scratchlm.train.metrics import Panel
from scratchlm.train.trainer import run_trainer


@dataclass
class DPOConfig(ChatConfig):
    beta: float = 0.1  # how far the policy may move from the reference (larger: less far)
    # dropout would make the policy's log-probs noisy and biased against the reference's
    disable_dropout: bool = True
    rpo_alpha: float = 0.0  # > 0: add alpha x the chosen replies' per-token NLL (RPO; TRL's rpo_alpha)

    SECTION: ClassVar[str] = "dpo"
    RULES: ClassVar[dict] = {**CHAT_RULES, "beta": Rule(above=0)}
    DATA: ClassVar[str] = "a JSONL file of pairs"


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's masked target tokens: (B, T, V), (B, T), (B, T) -> (B,).

    ``log p(y) = z[y] - logsumexp(z)``, one row at a time: never a (B, T, V) float32 log-softmax
    (13 GB for 64 rows of GPT-2's vocabulary at 1,024 positions)."""
    out = []
    for z, y, m in zip(logits, targets, mask):
        logp = z.gather(-1, y.clamp_min(0)[:, None])[:, 0].float() - torch.logsumexp(z.float(), dim=-1)
        out.append((logp * m).sum())
    return torch.stack(out)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """The DPO loss (mean over pairs) and TRL's reward metrics."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margins = chosen - rejected
    loss = -F.logsigmoid(margins).mean()
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": margins.mean(),
        "rewards/accuracies": (margins > 0).float().mean(),
    }
    return loss, metrics


class DPOTrainer(ChatTrainer):
    """Pairs against a frozen reference: the model as training starts."""

    method = "dpo"
    plot_panels = (
        Panel("DPO loss", (("loss", "train"), ("val_loss", "held out")), "loss"),
        Panel(
            "reward margin (β·log-ratio, chosen − rejected)",
            (("rewards/margins", "train"), ("val_rewards/margins", "held out")),
            "reward margin",
        ),
        Panel(
            "fraction of pairs",
            (
                ("rewards/accuracies", "reward accuracy, train"),
                ("val_rewards/accuracies", "reward accuracy, held out"),
                ("val_preference_accuracy", "preference accuracy, held out"),
            ),
            "accuracy",
        ),
    )

    def _prepare_data(self, model_section: dict) -> None:
        self._prepare_tokenizer()
        self.train_rows, self.val_rows, self.val_conversations = prepare_pairs(self)

    def _initial_model(self):
        model = self._load_base_model().to(self.device)
        # as TRL does: the reference runs without dropout, so must the policy
        if self.settings.disable_dropout:
            model.set_dropout(0.0)
        # The reference is the model as it starts, frozen: its log-probabilities once, now.
        self.train_refs = self._logps_of(model, self.train_rows)
        self.val_refs = self._logps_of(model, self.val_rows)
        rows, refs, pad = self.train_rows, self.train_refs, self.template.pad_id

        def batch(index: list[int]):  # x, y, mask of the chosen rows then the rejected, and their references
            x, y, mask = collate([rows[i][0] for i in index] + [rows[i][1] for i in index], pad, self.device)
            return x, y, mask, refs[index].to(self.device)

        self.train_loader = PairBatches(
            len(rows), self.cfg.batch_size, self.cfg.seed, batch, self.rank, self.world_size
        )
        return model

    def _step_lines(self) -> list[str]:
        return pair_step_lines(self)

    @torch.no_grad()
    def _logps_of(self, model, rows) -> torch.Tensor:
        """(N, 2) summed log-probabilities of each pair's chosen and rejected reply."""
        from contextlib import nullcontext

        was_training = model.training
        model.eval()
        # The same precision as the training steps (bf16 autocast on a GPU): a reference in fp32
        # against a bf16 policy would start with margins that are not 0.
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        )
        out = []
        step = self.cfg.batch_size
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            x, y, mask = collate(
                [r[0] for r in chunk] + [r[1] for r in chunk], self.template.pad_id, self.device
            )
            with autocast:
                logits = model(x)[0]
            logps = sequence_logps(logits, y, mask)
            out.append(torch.stack([logps[: len(chunk)], logps[len(chunk) :]], dim=1))
        model.train(was_training)
        return torch.cat(out).cpu()

    def _begin_step(self, batches: list) -> None:
        """Nothing to count: every micro-batch holds the same number of pairs, each weighing one."""

    def _loss(self, batch) -> torch.Tensor:
        x, y, mask, refs = batch
        logps = sequence_logps(self.step_model(x)[0], y, mask)
        B = refs.shape[0]
        loss, self.step_extras = dpo_loss(logps[:B], logps[B:], refs[:, 0], refs[:, 1], self.settings.beta)
        if self.settings.rpo_alpha:
            # DPO only asks the chosen reply to gain on the rejected one; both may lose likelihood,
            # and greedy decoding then drifts to a third answer. An SFT term on the chosen replies
            # (Pang et al., 2024, "RPO") keeps them likely.
            nll = (-logps[:B] / mask[:B].sum(dim=-1).clamp_min(1)).mean()
            self.step_extras["nll"] = nll.detach()
            loss = loss + self.settings.rpo_alpha * nll
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """The DPO loss on the held-out pairs; its reward metrics go to the log (rank 0's values)."""
        self.model.eval()
        logps = self._logps_of(self.model, self.val_rows)
        loss, metrics = dpo_loss(
            logps[:, 0], logps[:, 1], self.val_refs[:, 0], self.val_refs[:, 1], self.settings.beta
        )
        # TRL's rewards/accuracies is relative to the reference (0 at the start, where every margin
        # is 0); the preference accuracy is absolute: how often the model itself finds the chosen
        # reply likelier than the rejected one, against the reference's.
        metrics["preference_accuracy"] = (logps[:, 0] > logps[:, 1]).float().mean()
        metrics["reference_preference_accuracy"] = (self.val_refs[:, 0] > self.val_refs[:, 1]).float().mean()
        self.model.train()
        values = self._shared([loss.item(), *(v.item() for v in metrics.values())], op="rank0")
        self.eval_extras = {f"val_{k}": v for k, v in zip(metrics, values[1:])}
        return values[0]

    def _check_resumable(self) -> dict:
        state = super()._check_resumable()
        self._require_same_base(state)  # the reference is recomputed from the base
        return state


def dpo(
    dpo_config: dict,
    train_config: dict,
    *,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """DPO on ``dpo_config["data"]`` (pairs) from ``dpo_config["base"]`` (usually an SFT checkpoint)."""
    dcfg = DPOConfig.from_dict(dpo_config)
    # TRL's default is 1e-6 for large models; these small ones move little below 1e-5.
    cfg = TrainConfig.from_dict(
        train_config,
        defaults={**CHAT_TRAIN_DEFAULTS, "lr": 1e-5 if not dcfg.lora_rank else 1e-4, "warmup_steps": 10},
    )
    return run_trainer(lambda: DPOTrainer(dcfg, cfg, resume=resume, progress=progress, overwrite=overwrite))
