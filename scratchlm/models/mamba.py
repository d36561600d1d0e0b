"""A selective state-space mixer (Mamba, Gu & Dao 2023) for Mamba and Jamba (issue 9).

(Skeleton by the lead: the SSM engineer fills this module in.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from scratchlm.config import Rule, validate


@dataclass
class MambaConfig:
    d_state: int = 16

    def __post_init__(self):
        validate(self, "model.mamba", {"d_state": Rule(min=1)})


class Mamba(nn.Module):
    kv_cache = False  # its cache is a recurrent state, kept in ``cache.state(layer)``

    def __init__(self, config, layer: int):
        super().__init__()
        raise NotImplementedError("Mamba is being written")
