"""Multi-head Latent Attention (DeepSeek-V2/V3) (issue 9).

(Skeleton by the lead: the MLA engineer fills this module in.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from scratchlm.config import Rule, validate


@dataclass
class MLAConfig:
    kv_lora_rank: int = 64

    def __post_init__(self):
        validate(self, "model.mla", {"kv_lora_rank": Rule(min=1)})


class MLA(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        raise NotImplementedError("MLA is being written")
