"""The KV cache: keys and values of past positions, kept so each new token costs one position.

Without a cache, generating token ``t`` reruns attention over all ``t`` previous positions,
recomputing keys and values that have not changed: O(t^2) work per sequence. With it, each step
computes q, k, v for the *new* token only, appends k and v here, and attends over the stored ones.

Memory per token: ``2 (k and v) x n_layer x n_kv_head x head_dim x bytes per value``, which is
why grouped-query attention (fewer KV heads) matters for serving.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer keys and values: (layers, batch, n_kv_head, max_len, head_dim).

    Layers whose mixer keeps something else (a compressed latent, a bounded window, a recurrent
    state) keep it in :meth:`state`, a dict of tensors per layer whose first dimension is the batch.
    """

    paged = False  # contiguous rows; the engine's cache (scratchlm.serve.paged_attention) is paged

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        layers: list[int] | None = None,
    ):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot = {layer: i for i, layer in enumerate(layers)} if layers is not None else None
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.max_len = max_len
        self.length = 0  # positions filled, the same in every layer

    @classmethod
    def for_model(cls, model, batch: int, max_len: int | None = None) -> KVCache:
        """A cache with k, v rows for the layers whose mixer keeps them (``kv_cache = True``)."""
        c = model.config
        p = next(model.parameters())
        layers = [i for i, block in enumerate(model.blocks) if getattr(block.mixer, "kv_cache", False)]
        return cls(
            len(layers), batch, c.kv_heads, max_len or c.block_size, c.head_dim, p.device, p.dtype, layers
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v (B, Hkv, T, D) for ``layer``; return all positions so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        layer = self.slot[layer] if self.slot is not None else layer
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def state(self, layer: int) -> dict[str, torch.Tensor]:
        """The per-layer store of a mixer that keeps something other than k, v (empty at first)."""
        return self.states.setdefault(layer, {})

    def advance(self, n: int) -> None:
        """Called by the model once every layer has stored its ``n`` new positions."""
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search: the surviving beams' histories).

        Only the ``length`` filled positions are copied (a 4096-long cache holding 300 positions
        moves 300, not 4096), and the identity permutation costs nothing.
        """
        n, batch = self.length, self.k.shape[1]
        if len(index) == batch and torch.equal(index, torch.arange(batch, device=index.device)):
            return
        if len(index) != batch:  # the number of rows changes (beam search's first step: 1 -> beams)
            shape = (self.k.shape[0], len(index), *self.k.shape[2:])
            k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        else:
            k, v = self.k, self.v
        k[:, :, :, :n] = self.k[:, index, :, :n]  # the right side is a gathered copy: safe in place
        v[:, :, :, :n] = self.v[:, index, :, :n]
        self.k, self.v = k, v
        for state in self.states.values():
            for name, tensor in state.items():
                state[name] = tensor.index_select(0, index.to(tensor.device))

    @property
    def bytes(self) -> int:
        other = sum(t.numel() * t.element_size() for state in self.states.values() for t in state.values())
        return self.k.numel() * self.k.element_size() * 2 + other
