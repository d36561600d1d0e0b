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
    """The cache's memory: ``k`` and ``v`` of shape (n_layer, num_blocks * block_size, n_kv_head, head_dim)."""

    def __init__(self, n_layer: int, num_blocks: int, block_size: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, num_blocks * block_size, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size

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
            self.decode_distance = (lengths[:, None] - 1 - key_pos[None, :]).clamp_min(0)  # for ALiBi

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi=None) -> torch.Tensor:
        """Store this step's k, v (1, Hkv, N, D) in the pool, then attend: q (1, H, N, D) -> (1, H, N, D)."""
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]  # (slots, Hkv, D)
        pool_k.index_copy_(0, self.slot_mapping, k[0].transpose(0, 1))
        pool_v.index_copy_(0, self.slot_mapping, v[0].transpose(0, 1))
        gqa = q.shape[1] != k.shape[1]
        out = torch.empty_like(q)
        for row, n, start, key_slots in self.prefills:
            qi = q[:, :, row : row + n]  # (1, H, n, D)
            ki = pool_k[key_slots].transpose(0, 1)[None]  # (1, Hkv, start + n, D)
            vi = pool_v[key_slots].transpose(0, 1)[None]
            if start == 0 and alibi is None:
                y = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
            else:
                mask = attention_bias(n, start + n, start, alibi, q.device, q.dtype)
                y = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=gqa)
            out[:, :, row : row + n] = y
        if len(self.decode_rows):
            qd = q[0][:, self.decode_rows].transpose(0, 1)[:, :, None]  # (Bd, H, 1, D)
            kd = pool_k[self.decode_slots].transpose(1, 2)  # (Bd, Hkv, longest, D)
            vd = pool_v[self.decode_slots].transpose(1, 2)
            if alibi is None:
                mask = self.decode_valid[:, None, None, :]  # (Bd, 1, 1, longest), True = attend
            else:
                slopes = alibi.to(device=q.device, dtype=q.dtype)
                mask = -slopes[None, :, None, None] * self.decode_distance[:, None, None, :].to(q.dtype)
                mask = mask.masked_fill(~self.decode_valid[:, None, None, :], float("-inf"))
            y = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=gqa)  # (Bd, H, 1, D)
            out[0][:, self.decode_rows] = y[:, :, 0].transpose(0, 1)
        return out
