"""Resume checkpoints: what one holds, atomic writes, and a fingerprint that decides whether one may
be resumed.

A checkpoint holds the whole training state: the weights, the AdamW moments and Muon's momentum,
the GradScaler, the batch generator, every rank's CPU and CUDA RNG state (dropout draws differ
across ranks), the step, tokens and seconds so far, and the metric history. `RunCheckpoint` captures it from the live
objects and restores it into them; restoring all of it makes a resumed run draw exactly the batches
and dropout masks an uninterrupted run would have, so it ends with the same weights.

Where the checkpoint lives, and why: `checkpoints/pretrain/last.pt` is a scratch file, git-ignored
and outside the pretrain stage's declared outputs. DVC therefore never deletes it before running
the stage (DVC removes declared outputs first), so rerunning `dvc repro` after an interruption
finds it and continues; and since it is not an output, DVC's run-cache can restore `data/model`
and `reports/train` for params already run instead of retraining. The stage deletes it after a
successful finish. The trade-off: the checkpoint is not versioned, so only the most recent
interrupted run can be resumed on this machine (starting other params discards it, with a
message), and it does not travel with `dvc push`. A persisted output (`persist: true`) would
instead switch the run-cache off for the stage, so going back to old params would retrain.

A checkpoint is resumed only when its fingerprint matches the current run's: a sha256 over
everything that shapes the trained weights or the logged metric history (the model config, the
train params, the resolved device and precision, the world size, the tokenizer fingerprint and
a hash of every training and validation token). Left out, because they change neither:
`train.checkpoint_interval` (when snapshots are taken), `train.compile` and
`train.activation_checkpointing` (the same math, only faster or leaner), and the launch
(`train.nproc_per_node`, `train.nnodes`, `train.rdzv_endpoint`): the world size, their product, is in
the fingerprint, and how its ranks are spread over nodes or where they meet changes no number. A
checkpoint of another world size is discarded: its global batch and per-rank RNG states do not fit.

Under DDP every rank must be training the same run (same params, data and device type): a node with
another params.yaml or other shards would hang in a collective or train on mismatched batches, so the
ranks compare their fingerprint inputs before anything else (`check_ranks_agree`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tinylm.config import TrainParams
from tinylm.errors import PipelineError
from tinylm.files import atomic_path
from tinylm.model import GPT, GPTConfig
from tinylm.training.batches import TrainBatches
from tinylm.training.optimizers import Optimizers
from tinylm.training.runtime import Distributed

CHECKPOINT_FORMAT = 2  # 2: the optimizer state is a dict per optimizer (AdamW, Muon)
DIGEST_CHARS = 64  # a checkpoint file starts with the hex sha256 of the rest, then a newline
NOT_IN_FINGERPRINT = ("checkpoint_interval", "compile", "activation_checkpointing", "nproc_per_node", "nnodes",
                      "rdzv_endpoint")


def hash_tokens(arrays: list[np.ndarray]) -> str:
    """sha256 over the token arrays (memory-mapped shards hash without being loaded in full)."""
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array, dtype="<u2")
        digest.update(len(contiguous).to_bytes(8, "little"))
        digest.update(memoryview(contiguous).cast("B"))
    return digest.hexdigest()


def fingerprint_inputs(model: GPTConfig, train: TrainParams, *, device_type: str, precision: str,
                       world_size: int, tokenizer_fingerprint: str, data_hashes: dict[str, str]) -> dict[str, Any]:
    """The values the fingerprint is taken over, kept in the checkpoint to explain a mismatch."""
    train_values = {k: v for k, v in dataclasses.asdict(train).items() if k not in NOT_IN_FINGERPRINT}
    train_values.update(device=device_type, precision=precision)  # resolved, not "auto"
    return {"format": CHECKPOINT_FORMAT, "model": dataclasses.asdict(model), "train": train_values,
            "world_size": world_size, "tokenizer": tokenizer_fingerprint, "data": data_hashes}


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def check_ranks_agree(inputs: dict[str, Any], distributed: Distributed) -> None:
    """Fail on every rank, naming the differences, unless all ranks have rank 0's fingerprint inputs."""
    if distributed.world_size == 1:
        return
    everyone: list[Any] = [None] * distributed.world_size
    dist.all_gather_object(everyone, inputs)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            raise PipelineError(
                f"rank {rank} is not training the same run as rank 0 ({'; '.join(_differences(everyone[0], theirs))}). "
                "Fix: give every node the same code, params.yaml and data (the same `dvc exp run -S ...` on each node, "
                "see README, 'Several GPUs and nodes').")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write the whole training state atomically: a kill -9 at any moment leaves the old or the new file.
    The file is the sha256 of torch.save's bytes (hex, one line), then those bytes: a checkpoint damaged
    on disk is discarded instead of resumed from (torch.load would read most damaged weights silently)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n")
        f.write(payload)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state `save_checkpoint` wrote, after checking its sha256 (ValueError when it does not match)."""
    data = Path(path).read_bytes()
    digest, payload = data[:DIGEST_CHARS], memoryview(data)[DIGEST_CHARS + 1:]
    if hashlib.sha256(payload).hexdigest().encode("ascii") != digest:
        raise ValueError("its sha256 does not match its contents: the file is damaged")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def remove_stale_temp_files(path: str | Path) -> None:
    """A save killed mid-write leaves its temp file (atomic_path names it `.{name}.*.tmp`); drop those."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state if `path` holds a checkpoint of this very run (same fingerprint), else None.

    A checkpoint of other params, or an unreadable one, is deleted with a message saying why.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = read_checkpoint(path)
        saved_fingerprint = state["fingerprint"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported and discarded alike
        print(f"checkpoint: discarding {path}: unreadable ({type(exc).__name__}: {exc}); starting from step 0",
              flush=True)
        path.unlink()
        return None
    if saved_fingerprint != fingerprint(inputs):
        changes = _differences(state.get("fingerprint_inputs", {}), inputs)
        print(f"checkpoint: discarding {path}: it belongs to a run with other params or data "
              f"({'; '.join(changes) or 'fingerprint differs'}); starting from step 0", flush=True)
        path.unlink()
        return None
    return state


def remove_checkpoint(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)
    remove_stale_temp_files(path)


@dataclasses.dataclass
class Position:
    """Where a run stands: updates made, tokens trained, seconds spent, and the metric rows so far."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class RunCheckpoint:
    """This run's checkpoint file, and the live objects its state is captured from and restored into.

    Under DDP every rank calls each method (they are collectives): rank 0 alone reads the file to resume
    and broadcasts it, and local rank 0 of every node writes it into its node's workspace
    (`Distributed.writes_outputs`): the nodes need no shared filesystem, and whichever node rank 0 lands on
    in a rerun holds a copy. Every rank's RNG state is gathered by all of them.
    """

    def __init__(self, path: str | Path, inputs: dict[str, Any], *, model: GPT, optimizer: Optimizers,
                 scaler: torch.amp.GradScaler, batches: TrainBatches, device: torch.device,
                 distributed: Distributed):
        """`inputs` are this run's fingerprint inputs (`fingerprint_inputs`); `model` is the bare model,
        not its DDP or torch.compile wrapper, so the saved keys do not depend on either."""
        self.path = Path(path)
        self.inputs = inputs
        self.model, self.optimizer, self.scaler, self.batches = model, optimizer, scaler, batches
        self.device = device
        self.distributed = distributed

    def capture(self, position: Position) -> dict[str, Any] | None:
        """The state to save, on each node's local rank 0 (None on the others, which only contribute their RNG state).

        Its tensors are the live ones, not copies (a copy would double the memory): save it before
        the next step changes them.
        """
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rng_per_rank = [rng]
        if self.distributed.world_size > 1:
            rng_per_rank = [None] * self.distributed.world_size
            dist.all_gather_object(rng_per_rank, rng)
        if not self.distributed.writes_outputs:
            return None
        return {
            "fingerprint": fingerprint(self.inputs), "fingerprint_inputs": self.inputs,
            "step": position.step, "tokens": position.tokens, "elapsed_s": position.elapsed_s,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "batches": self.batches.state(), "rng": rng_per_rank,
            "history": position.history,
        }

    def restore(self, state: dict[str, Any]) -> Position:
        """Load a captured state into the live objects, and this rank's own RNG state; where it stood."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state(state["batches"])
        rng = state["rng"][self.distributed.rank]
        torch.set_rng_state(rng["cpu"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        return Position(state["step"], state["tokens"], state["elapsed_s"], state["history"])

    def save(self, position: Position) -> None:
        state = self.capture(position)
        if state is not None:
            save_checkpoint(self.path, state)

    def resume(self) -> Position | None:
        """Restore this run's checkpoint, if there is one (see `load_checkpoint`), and say where it stood."""
        state = None
        if self.distributed.writes_outputs:
            remove_stale_temp_files(self.path)
        if self.distributed.is_main:
            state = load_checkpoint(self.path, self.inputs)
        if self.distributed.world_size > 1:
            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        if state is None:
            return None
        position = self.restore(state)
        if self.distributed.is_main:
            print(f"checkpoint: resuming {self.path} at step {position.step}", flush=True)
        return position
