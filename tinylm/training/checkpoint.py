"""Resume checkpoints: atomic writes, and a fingerprint that decides whether one may be resumed.

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
`train.activation_checkpointing` (the same math, only faster or leaner).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm.config import TrainParams
from tinylm.files import atomic_path
from tinylm.model import GPTConfig

CHECKPOINT_FORMAT = 1
NOT_IN_FINGERPRINT = ("checkpoint_interval", "compile", "activation_checkpointing")


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


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write the whole training state atomically: a kill -9 at any moment leaves the old or the new file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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
        state = torch.load(path, map_location="cpu", weights_only=True)
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
