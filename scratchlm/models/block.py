"""One layer of the stack: a mixer then an MLP, and the registry of the kinds a layer can pick.

``GPTConfig.layers`` names each layer's kinds as "mixer" or "mixer+mlp" (Jamba's ``["mamba",
"mamba+moe", ...]``, DeepSeek's ``["mla"] * 3 + ["mla+moe"] * 58``). The tables below are the one
place those names are defined: ``MIXERS`` and ``LAYER_MLPS`` build a kind's module, and
``KIND_TABLES`` names the settings table (``[model.moe]``, ``[model.mla]``, ...) each kind reads.
"attention" and "sliding" layers read ``[model.attn]``, which every config has (it is not created
on first use, so it is not listed there).
``models/config.py`` validates a pattern against them; each kind's module under ``models/blocks/``
owns its code and its settings dataclass.
"""

from __future__ import annotations

from torch import nn

from scratchlm.models.blocks.attention import Attention
from scratchlm.models.blocks.diff_attention import DiffAttention, DiffConfig
from scratchlm.models.blocks.mamba import Mamba, MambaConfig
from scratchlm.models.blocks.mla import MLA, MLAConfig
from scratchlm.models.blocks.moe import MoE, MoEConfig
from scratchlm.models.blocks.sparse_attention import NativeSparseAttention, NSAConfig
from scratchlm.models.layers import MLP, make_norm

# The block kinds a layer can pick (``GPTConfig.layers``): "mixer" or "mixer+mlp".
MIXERS = {
    "attention": lambda c, layer: Attention(c),  # full causal attention (MHA / GQA / MQA)
    "sliding": lambda c, layer: Attention(c, window=c.attn.window),  # Mistral, Gemma-2's local layers
    "diff": DiffAttention,  # differential attention
    "mla": MLA,  # multi-head latent attention (DeepSeek-V2/V3)
    "nsa": NativeSparseAttention,  # native sparse attention
    "mamba": Mamba,  # selective state-space model
}
LAYER_MLPS = {
    "dense": lambda c, layer: MLP(c),
    "moe": MoE,
    "none": lambda c, layer: None,
}  # no MLP: the block is norm → mixer → residual (Mamba)
# The settings table each kind reads (kind -> (GPTConfig field, dataclass)), created with its
# defaults when a layer uses the kind.
KIND_TABLES = {
    "mla": ("mla", MLAConfig),
    "diff": ("diff", DiffConfig),
    "nsa": ("nsa", NSAConfig),
    "mamba": ("mamba", MambaConfig),
    "moe": ("moe", MoEConfig),
}


class Block(nn.Module):
    """A mixer then an MLP, each wrapped in a residual connection and a norm.

    The mixer is ``self.attn`` for every kind of attention (so checkpoints of plain models keep
    their tensor names) and ``self.mamba`` for the state-space mixer; ``self.mlp`` is dense, MoE, or
    None (mlp kind "none": Mamba's blocks are a norm and a mixer only). ``config`` is a
    ``GPTConfig``, not imported here: the config reads this module's registry.
    """

    def __init__(self, config, layer: int = 0):
        super().__init__()
        mixer_kind, mlp_kind = config.layer_kinds()[layer]
        self.prenorm = config.prenorm
        self.norm1 = make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        self.mixer_name = "mamba" if mixer_kind == "mamba" else "attn"
        self.add_module(self.mixer_name, MIXERS[mixer_kind](config, layer))
        self.norm2 = (
            make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
            if mlp_kind != "none"
            else None
        )
        self.mlp = LAYER_MLPS[mlp_kind](config, layer)
        # Gemma-2's "sandwich": each sublayer's output is normalized too before it joins the residual stream
        sandwich = bool(config.sandwich_norm)
        self.post_norm1 = (
            make_norm(config.norm, config.d_model, config.norm_eps, config.bias) if sandwich else None
        )
        self.post_norm2 = (
            make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
            if sandwich and self.mlp is not None
            else None
        )
        self.resid_dropout = nn.Dropout(config.dropout)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    def forward(self, x, **attn_kwargs):
        mixer = self.mixer
        if self.prenorm:  # GPT-2, Llama: the residual stream itself is never normalized
            h = mixer(self.norm1(x), **attn_kwargs)
            x = x + self.resid_dropout(h if self.post_norm1 is None else self.post_norm1(h))
            if self.mlp is None:
                return x
            h = self.mlp(self.norm2(x))
            return x + (h if self.post_norm2 is None else self.post_norm2(h))
        # post-norm (the original Transformer): normalize after adding
        x = self.norm1(x + self.resid_dropout(mixer(x, **attn_kwargs)))
        return x if self.mlp is None else self.norm2(x + self.mlp(x))
