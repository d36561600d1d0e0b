"""Differential attention (Ye et al. 2024) (issue 9).

(Skeleton by the lead: the differential-attention engineer fills this module in.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from scratchlm.config import Rule, validate


@dataclass
class DiffConfig:
    version: int = 1

    def __post_init__(self):
        validate(self, "model.diff", {"version": Rule(choices=(1, 2))})


class DiffAttention(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        raise NotImplementedError("differential attention is being written")
