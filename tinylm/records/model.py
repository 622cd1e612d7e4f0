"""The pretrain stage's record, data/model/model.json: what was trained, on which tokenizer's ids, and
the sha256 of the weights file beside it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingSummary:
    """What was trained: model.pt's `extra`, and model.json without the weights' hash (a file cannot
    hold its own hash)."""

    config: dict[str, int | float | bool | str]  # tinylm.model.GPTConfig's fields (a dict: that module imports torch)
    params: int  # a tied LM head counted once
    params_without_embeddings: int
    steps: int
    tokens_trained: int
    final_train_loss: float
    final_val_loss: float
    tokenizer_fingerprint: str  # the model's ids mean tokens of this tokenizer only


@dataclass(frozen=True)
class ModelSummary(TrainingSummary):
    """data/model/model.json (tinylm.model.save_trained_model writes it, load_trained_model checks it)."""

    model_sha256: str  # of model.pt: a damaged or mismatched weights file fails where it is read
