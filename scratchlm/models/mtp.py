"""Multi-token prediction (DeepSeek-V3 MTP modules; Gloeckle et al. 2024 parallel heads) (issue 9).

(Skeleton by the lead: the MTP engineer fills this module in.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from scratchlm.config import Rule, validate


@dataclass
class MTPConfig:
    depth: int = 1
    weight: float = 0.3

    def __post_init__(self):
        validate(self, "model.mtp", {"depth": Rule(min=1), "weight": Rule(min=0)})


class MTP(nn.Module):
    def __init__(self, config):
        super().__init__()
        raise NotImplementedError("MTP is being written")
