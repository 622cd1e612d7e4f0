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

from tinylm.config import TrainParams
from tinylm.errors import PipelineError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this node

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reads a checkpoint to resume and hands it to the others."""
        return self.rank == 0

    @property
    def writes_outputs(self) -> bool:
        """Local rank 0: one process per node writes the outputs, metric logs and checkpoints into its node's
        workspace, and prints the progress. Per node, not rank 0 alone: the c10d rendezvous numbers the
        nodes by host name, so rank 0 may be on any node, and `dvc exp run` on each node needs the
        outputs in its own workspace. Every rank holds the same weights, so every node writes the same bytes.
        """
        return self.local_rank == 0


def check_launch(train: TrainParams, distributed: Distributed) -> None:
    """The processes that run must be the ones train.nproc_per_node and train.nnodes describe: the world size
    sets the global batch, so a launch other than the params' would train a model DVC records wrongly."""
    launched = f"this node runs {distributed.local_world_size} of {distributed.world_size} process(es)"
    fix = ("Fix: run the stage as dvc.yaml says (dvc repro pretrain, or dvc exp run -S train.nproc_per_node=N "
           "-S train.nnodes=M), or set those params to the launch.")
    if distributed.local_world_size != train.nproc_per_node:
        raise PipelineError(f"train.nproc_per_node is {train.nproc_per_node}, but {launched}. {fix}")
    if distributed.world_size != train.nproc_per_node * train.nnodes:
        raise PipelineError(f"train.nnodes is {train.nnodes} ({train.nproc_per_node} process(es) each), "
                            f"but {launched}. {fix}")


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """CUDA when asked for or available, one GPU per process of the node (`cuda:local_rank`); else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is 'cuda' but no CUDA GPU is visible. Fix: set train.device to "
                            "'auto' or 'cpu' in params.yaml.")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise PipelineError(f"this node has {torch.cuda.device_count()} CUDA GPU(s), but more processes than that: "
                            f"local rank {local_rank} has none. Fix: set train.nproc_per_node to at most "
                            f"{torch.cuda.device_count()}.")
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
