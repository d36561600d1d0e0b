"""Optimizers: AdamW with decay on matrices only, and Muon for hidden matrices.

**AdamW**: weight decay shrinks weights toward zero each step. It is applied to matrices
(linear layers, embeddings) and not to vectors (biases, norm gains), whose scale carries meaning
that decay would only fight.

**Muon** (Jordan et al., 2024): for a hidden weight matrix, take the momentum of its gradient and
replace it by the nearest semi-orthogonal matrix (same singular vectors, all singular values ~1),
computed with a few Newton-Schulz iterations. Every direction of the update then moves at the
same rate, which trains small Transformers markedly faster per step. Embeddings, the output
layer and vectors stay on AdamW.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    # Embeddings, the output matrix and scalar heads (a reward model's score, PPO's value head:
    # 1 x d, nothing for Muon to orthogonalise) go to AdamW, and so does an MoE router (a few
    # rows whose scale sets how peaked routing is). A stack of experts' matrices (E, rows, cols)
    # is E hidden matrices: each is orthogonalised on its own.
    if name.endswith("router.weight") or name.startswith(
        ("tok_emb", "pos_emb", "lm_head", "score", "value_head")
    ):
        return False
    return p.dim() == 2 or (p.dim() == 3 and ".experts_" in name)


def exempt(model: nn.Module) -> set[int]:
    """Parameters (by id) that are not weight matrices whatever their shape: a module lists them by
    name in ``no_weight_decay`` (Mamba's log-decay rates A_log, its skip gain D, Δ's bias)."""
    ids = set()
    for module in model.modules():
        for name in getattr(module, "no_weight_decay", ()):
            ids.add(id(getattr(module, name)))
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen, vectors = [], [], set(), exempt(model)
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in vectors else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize ``g`` (U S V^T -> U V^T) with a quintic Newton-Schulz iteration.

    The coefficients make the iteration push every singular value in (0, 1] toward ~1 fast;
    it runs in bfloat16-friendly matrix multiplies only.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()  # (..., rows, cols): a batch of same-shaped matrices is orthogonalized at once
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # singular values now <= 1
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update is orthogonalized by :func:`newton_schulz`."""

    def __init__(
        self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5
    ):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                by_shape.setdefault(tuple(p.shape), []).append(
                    (p, p.grad.lerp(buf, group["momentum"]))
                )  # Nesterov
            for shape, items in by_shape.items():
                # Same-shaped matrices (one per layer) are orthogonalized in one batched call.
                updates = newton_schulz(torch.stack([u for _, u in items]), group["ns_steps"])
                # Scale so the update's RMS does not depend on the matrix's aspect ratio.
                updates *= max(1.0, shape[-2] / shape[-1]) ** 0.5
                for (p, _), update in zip(items, updates):
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"])


def build_optimizers(model: nn.Module, cfg, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW (all parameters), or Muon for hidden matrices plus AdamW for the rest."""
    fused = device.type == "cuda"
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return [torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, fused=fused)]
    if cfg.optimizer != "muon":
        raise ValueError(f"optimizer must be 'adamw' or 'muon', got {cfg.optimizer!r}")
    hidden, rest, seen, vectors = [], [], set(), exempt(model)
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (hidden if _is_hidden_matrix(name, p) and id(p) not in vectors else rest).append((name, p))
    # Decoupled weight decay on the hidden matrices too (p <- p * (1 - lr * wd), as in Moonlight's
    # Muon): without it train.weight_decay would reach only the embeddings.
    muon = Muon(
        [p for _, p in hidden], lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay
    )
    groups = [
        {
            "params": [p for _, p in rest if p.dim() >= 2 and id(p) not in vectors],
            "weight_decay": cfg.weight_decay,
        },
        {"params": [p for _, p in rest if p.dim() < 2 or id(p) in vectors], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused)
    return [adamw, muon]
