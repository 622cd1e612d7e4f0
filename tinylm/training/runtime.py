"""Where and how the numbers run: the device, the precision, and this process's place in a torchrun job.

Precision: fp32 on CPU unless bf16 autocast is asked for; on CUDA bf16 autocast (no GradScaler:
bf16 has fp32's exponent range), or fp16 autocast with a GradScaler on GPUs without bf16.
`auto` picks among these. Master weights and optimizer state stay fp32 in every mode.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from tinylm.errors import PipelineError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is 'cuda' but no CUDA GPU is visible. Fix: set train.device to "
                            "'auto' or 'cpu' in params.yaml.")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def resolve_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    if requested == "auto":
        if device_type == "cuda":
            return "bf16" if bf16_supported else "fp16"
        return "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise PipelineError("train.precision 'fp16' needs a CUDA GPU (fp16 gradients need a GradScaler and "
                            "CPU autocast is bf16). Fix: use 'fp32', 'bf16' or 'auto'.")
    if requested == "bf16" and not bf16_supported:
        raise PipelineError("train.precision 'bf16': this GPU has no bf16 support. Fix: use 'fp16' or 'auto'.")
    return requested


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])


@contextlib.contextmanager
def process_group(distributed: Distributed, device: torch.device) -> Iterator[None]:
    """Join the torchrun job's process group (NCCL on CUDA, gloo on CPU) for the block; no-op alone."""
    if distributed.world_size == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        # Rank 0 still writes the final checkpoint and logs after the last step; a rank that tears
        # the group down meanwhile can abort inside gloo ("terminate called without an active
        # exception"). Meet first. Not on errors: the other rank may be gone, and waiting would hang.
        dist.barrier()
    finally:
        dist.destroy_process_group()
