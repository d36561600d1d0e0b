"""Paged attention: keys and values live in a pool of blocks; each sequence reads its own through
its block table.

The pool holds, per layer, ``num_blocks * block_size`` *slots* of ``(n_kv_head, head_dim)``.
Token ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

One engine step packs the scheduled tokens of every sequence into a single row of ``N`` tokens
(no padding): a decode contributes 1 token, a prefill chunk many. :class:`PagedBatch` is that step's
*attention metadata*, built once and used by every layer:

1. **store**: the new tokens' keys and values are written to their slots (``index_copy_``);
2. **attend**: each query reads the keys of its own sequence, positions ``0 ... its own``.
   Decodes (one query each) are batched into one call: their keys are *gathered* from the pool
   into a padded ``(batch, n_kv_head, longest, head_dim)`` tensor with a mask for the padding.
   Each prefill chunk is one call over its own gathered keys, with a causal mask offset by the
   tokens already cached.

The gather is what a first version on a CPU can do: it copies every key and value a step reads,
so attention moves about twice the bytes a fused paged kernel (vLLM's, FlashAttention's
``block_table`` argument) would. The model's weights are read once per step whatever the batch,
so at large batches and long contexts this copy is what decode time grows with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratchlm.models.layers import attention_bias


class KVPool:
    """The cache's memory: ``k`` and ``v`` of shape (n_layer, n_kv_head, num_blocks * block_size, head_dim).

    Heads come before slots so that a gather of any slots is, per head, a contiguous run of keys:
    the layout attention kernels read fastest. ``workspace`` is a buffer the decode gather writes
    into, kept between steps (allocating ~100 MB afresh for every layer of every step costs more
    in page faults than the copy itself).
    """

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, n_kv_head, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self._workspace = torch.empty(0, device=device, dtype=dtype)

    def workspace(self, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two (n_kv_head, slots, head_dim) buffers for gathered keys and values."""
        Hkv, D = self.k.shape[1], self.k.shape[3]
        if self._workspace.numel() < 2 * Hkv * slots * D:
            self._workspace = torch.empty(2 * Hkv * slots * D, device=self.k.device, dtype=self.k.dtype)
        buf = self._workspace[: 2 * Hkv * slots * D].view(2, Hkv, slots, D)
        return buf[0], buf[1]

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
        return 2 * config.n_layer * block_size * config.kv_heads * config.head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PagedBatch:
    """One step's packed tokens: positions, slots, and who attends to what.

    ``chunks`` lists, per scheduled sequence, ``(block_table, start, n)``: its tokens
    ``start ... start+n-1`` are computed this step, after ``start`` already in the cache.
    """

    paged = True

    def __init__(self, pool: KVPool, chunks: list[tuple[list[int], int, int]], device: torch.device | str = "cpu"):
        self.pool = pool
        bs = pool.block_size
        offsets = torch.arange(bs, device=device)

        def slots_of(table: list[int], length: int) -> torch.Tensor:  # slot of each token 0 ... length-1
            blocks = torch.tensor(table[: -(-length // bs)], device=device)
            return (blocks[:, None] * bs + offsets).flatten()[:length]

        positions, slots, ends, decodes = [], [], [], []
        self.prefills: list[tuple[int, int, int, torch.Tensor]] = []  # (first row, n, start, key slots)
        row = 0
        for table, start, n in chunks:
            positions.append(torch.arange(start, start + n, device=device))
            if n == 1:
                decodes.append((row, table, start + 1))
                slots.append(slots_of(table[start // bs : start // bs + 1], 1) + start % bs)
            else:
                key_slots = slots_of(table, start + n)
                self.prefills.append((row, n, start, key_slots))
                slots.append(key_slots[start:])
            row += n
            ends.append(row - 1)
        self.num_tokens = row
        self.positions = torch.cat(positions)
        self.slot_mapping = torch.cat(slots)
        self.last_rows = torch.tensor(ends, device=device)  # each sequence's last token this step
        self.decode_rows = torch.tensor([r for r, _, _ in decodes], device=device, dtype=torch.long)
        if decodes:
            lengths = torch.tensor([length for _, _, length in decodes], device=device)
            longest = int(lengths.max())
            width = -(-longest // bs)
            tables = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for _, t, _ in decodes], device=device)
            self.decode_slots = (tables[:, :, None] * bs + offsets).flatten(1)[:, :longest]  # (Bd, longest)
            key_pos = torch.arange(longest, device=device)
            self.decode_valid = key_pos[None, :] < lengths[:, None]  # (Bd, longest): False on padding
            self.decode_padded = bool((lengths != longest).any())
            self.decode_distance = (lengths[:, None] - 1 - key_pos[None, :]).clamp_min(0)  # for ALiBi

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi=None) -> torch.Tensor:
        """Store this step's k, v (1, Hkv, N, D) in the pool, then attend: q (1, H, N, D) -> (1, H, N, D)."""
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]  # (Hkv, slots, D)
        pool_k.index_copy_(1, self.slot_mapping, k[0])
        pool_v.index_copy_(1, self.slot_mapping, v[0])
        gqa = q.shape[1] != k.shape[1]
        out = torch.empty_like(q)
        for row, n, start, key_slots in self.prefills:
            qi = q[:, :, row : row + n]  # (1, H, n, D)
            ki = pool_k.index_select(1, key_slots)[None]  # (1, Hkv, start + n, D)
            vi = pool_v.index_select(1, key_slots)[None]
            if start == 0 and alibi is None:
                y = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
            else:
                mask = attention_bias(n, start + n, start, alibi, q.device, q.dtype)
                y = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=gqa)
            out[:, :, row : row + n] = y
        if len(self.decode_rows):
            Bd, longest = self.decode_slots.shape
            kd, vd = self.pool.workspace(Bd * longest)  # the gather: (Hkv, Bd * longest, D)
            torch.index_select(pool_k, 1, self.decode_slots.flatten(), out=kd)
            torch.index_select(pool_v, 1, self.decode_slots.flatten(), out=vd)
            kd = kd.view(-1, Bd, longest, kd.shape[-1]).transpose(0, 1)  # (Bd, Hkv, longest, D), a view
            vd = vd.view(-1, Bd, longest, vd.shape[-1]).transpose(0, 1)
            qd = q[0][:, self.decode_rows].transpose(0, 1)[:, :, None]  # (Bd, H, 1, D)
            if alibi is not None:
                slopes = alibi.to(device=q.device, dtype=q.dtype)
                mask = -slopes[None, :, None, None] * self.decode_distance[:, None, None, :].to(q.dtype)
                mask = mask.masked_fill(~self.decode_valid[:, None, None, :], float("-inf"))
            elif self.decode_padded:
                mask = self.decode_valid[:, None, None, :]  # (Bd, 1, 1, longest), True = attend
            else:
                mask = None  # every sequence has the same length: nothing to hide
            y = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=gqa)  # (Bd, H, 1, D)
            out[0][:, self.decode_rows] = y[:, :, 0].transpose(0, 1)
        return out
