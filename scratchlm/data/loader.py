"""Random ``(x, y)`` training windows from a token shard, read through memmap.

This is teacher forcing in data form: ``x`` is a window of ``block_size`` ids and ``y`` is the
same window shifted one to the left, so position ``t`` of ``y`` is the token that follows
``x[:t+1]``. Every position of every window is one next-token prediction.

The shard is memory-mapped, so a corpus larger than RAM costs nothing to open; only the windows
drawn are read.

Data parallel: every rank draws the same *global* batch of ``batch_size x world_size`` windows
(same seed) and keeps its own slice. The global batch is then the same whatever the number of
processes, so a 2-process run sees exactly the data of a 1-process run with twice the batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scratchlm.data.shards import open_shard
from scratchlm.tokenizers.base import Tokenizer


class BatchLoader:
    def __init__(
        self,
        shard: str | Path,
        block_size: int,
        batch_size: int,
        *,
        tokenizer: Tokenizer | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ):
        self.ids = open_shard(shard, tokenizer)
        if len(self.ids) < block_size + 1:
            raise ValueError(
                f"{shard} holds {len(self.ids)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use a shorter context or more data"
            )
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: ``x`` and ``y`` of shape (batch_size, block_size), int64, ``y`` shifted by one."""
        starts = torch.randint(
            len(self.ids) - self.block_size, (self.batch_size * self.world_size,), generator=self.generator
        )
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = np.stack([self.ids[s : s + self.block_size + 1] for s in starts.tolist()]).astype(np.int64)
        batch = torch.from_numpy(windows)
        x, y = batch[:, :-1], batch[:, 1:]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(
                self.device, non_blocking=True
            )
        return x.to(self.device), y.to(self.device)

    def __iter__(self):
        while True:
            yield self.get_batch()
