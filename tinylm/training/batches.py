"""Training and validation batches: windows of block_size + 1 tokens of a split's memory-mapped shards.

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
    """All windows of `block_size + 1` consecutive tokens of a split, numbered 0..count-1 by where they start.

    The split is its shards end to end, so a window may straddle a shard boundary and the windows,
    their numbers and so every batch drawn are the same however the split is cut into shards (one
    shard, as the default corpus makes, or hundreds, as the full TinyStories does). The shards stay
    memory-mapped: a batch reads only its rows.
    """

    def __init__(self, shards: list[np.ndarray], block_size: int, split: str):
        self.shards = [s for s in shards if len(s)]
        self.block_size = block_size
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.starts = np.cumsum(lengths) - lengths  # position of each shard's first token in the split
        total = int(lengths.sum())
        if total <= block_size:
            raise PipelineError(f"the {split} shards hold no window of model.block_size + 1 = {block_size + 1} "
                                f"tokens ({total} tokens in all). Fix: lower model.block_size in "
                                "params.yaml or give the pipeline more data (data.max_*_stories).")
        self.count = total - block_size

    def random(self, n: int, generator: torch.Generator) -> np.ndarray:
        return torch.randint(0, self.count, (n,), generator=generator).numpy()

    def evenly_spaced(self, n: int) -> np.ndarray:
        return np.linspace(0, self.count - 1, n).round().astype(np.int64)

    def window(self, start: int) -> np.ndarray:
        """Tokens start .. start + block_size of the split, read from as many shards as they span."""
        end = start + self.block_size + 1
        index = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < end:
            offset = start - int(self.starts[index])
            pieces.append(self.shards[index][offset:offset + end - start])
            start += len(pieces[-1])
            index += 1
        return np.concatenate(pieces)

    def gather(self, numbers: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, [len(numbers), block_size] each, as int64."""
        rows = np.stack([self.window(int(number)) for number in numbers])
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
