"""Native Sparse Attention (Yuan et al. 2025) (issue 9).

(Skeleton by the lead: the NSA engineer fills this module in.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from scratchlm.config import Rule, validate


@dataclass
class NSAConfig:
    block: int = 16

    def __post_init__(self):
        validate(self, "model.nsa", {"block": Rule(min=1)})


class NativeSparseAttention(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        raise NotImplementedError("NSA is being written")
