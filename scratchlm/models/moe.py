"""Mixture-of-Experts MLP (issue 9): top-k routing, shared experts, load balancing.

(Skeleton by the lead: the MoE engineer fills this module in.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from scratchlm.config import Rule, validate


@dataclass
class MoEConfig:
    n_experts: int = 8
    top_k: int = 2
    d_expert: int | None = None  # each routed expert's hidden width; None: the model's MLP width

    def __post_init__(self):
        validate(self, "model.moe", {"n_experts": Rule(min=1), "top_k": Rule(min=1), "d_expert": Rule(min=1)})


class MoE(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        raise NotImplementedError("MoE is being written")
