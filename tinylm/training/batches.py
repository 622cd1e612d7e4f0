"""Training and validation batches: windows of block_size + 1 tokens cut from memory-mapped shards.

Random training windows come from one seeded `torch.Generator` whose state goes into the
checkpoint, so a resumed run draws exactly the batches an uninterrupted run would have drawn.
Every rank of a distributed run draws the same global batch of the step and takes its own rows:
each rank sees different data, deterministically, and the union does not depend on the world
size (one process with N accumulation steps sees what N processes see).
"""
from __future__ import annotations

import numpy as np
import torch

from tinylm.errors import PipelineError


class TokenWindows:
    """All windows of `block_size + 1` consecutive tokens that fit inside one shard, numbered 0..count-1."""

    def __init__(self, shards: list[np.ndarray], block_size: int, split: str):
        self.shards = [s for s in shards if len(s) > block_size]
        if not self.shards:
            longest = max((len(s) for s in shards), default=0)
            raise PipelineError(f"the {split} shards hold no window of model.block_size + 1 = {block_size + 1} "
                                f"tokens (longest shard: {longest} tokens). Fix: lower model.block_size in "
                                "params.yaml or give the pipeline more data (data.max_*_stories).")
        self.block_size = block_size
        self.per_shard = np.array([len(s) - block_size for s in self.shards], dtype=np.int64)
        self.first = np.cumsum(self.per_shard) - self.per_shard  # number of the shard's first window
        self.count = int(self.per_shard.sum())

    def random(self, n: int, generator: torch.Generator) -> np.ndarray:
        return torch.randint(0, self.count, (n,), generator=generator).numpy()

    def evenly_spaced(self, n: int) -> np.ndarray:
        return np.linspace(0, self.count - 1, n).round().astype(np.int64)

    def gather(self, numbers: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, [len(numbers), block_size] each, as int64."""
        shard = np.searchsorted(self.first, numbers, side="right") - 1
        offset = numbers - self.first[shard]
        rows = np.stack([self.shards[i][o:o + self.block_size + 1] for i, o in zip(shard, offset)])
        tokens = torch.from_numpy(rows.astype(np.int64))
        return tokens[:, :-1], tokens[:, 1:]


class TrainBatches:
    """The micro-batches of each optimizer step for one rank, from a checkpointable generator."""

    def __init__(self, windows: TokenWindows, seed: int, micro_batch_size: int, grad_accum_steps: int,
                 rank: int, world_size: int):
        self.windows = windows
        self.generator = torch.Generator().manual_seed(seed)
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.rank = rank
        self.world_size = world_size

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's grad_accum_steps micro-batches of the next step's global batch."""
        B, N = self.micro_batch_size, self.grad_accum_steps
        numbers = self.windows.random(B * N * self.world_size, self.generator)
        mine = numbers[self.rank * B * N:(self.rank + 1) * B * N]
        return [self.windows.gather(mine[i * B:(i + 1) * B]) for i in range(N)]

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def validation_batches(windows: TokenWindows, num_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set spread evenly over the split, so every evaluation scores the same tokens."""
    numbers = windows.evenly_spaced(num_batches * batch_size)
    return [windows.gather(numbers[i * batch_size:(i + 1) * batch_size]) for i in range(num_batches)]
