"""The block kinds a layer can pick, one module each with its settings table.

Mixers: ``attention`` (full and sliding-window, with FlashAttention's tiled form in
``flash_attention``), ``mla`` (multi-head latent attention), ``diff_attention`` (differential),
``sparse_attention`` (native sparse attention), ``mamba`` (selective state space). MLPs: ``moe``
(mixture of experts). After the stack: ``mtp`` (multi-token prediction). The registry that names
them for ``GPTConfig.layers`` is ``models/block.py``.
"""
