"""The pretrain stage's record, data/model/model.json: what was trained, on which tokenizer's ids."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSummary:
    """data/model/model.json, also stored as model.pt's `extra`."""

    config: dict[str, int | float | bool | str]  # tinylm.model.GPTConfig's fields (a dict: that module imports torch)
    params: int  # a tied LM head counted once
    params_without_embeddings: int
    steps: int
    tokens_trained: int
    final_train_loss: float
    final_val_loss: float
    tokenizer_fingerprint: str  # the model's ids mean tokens of this tokenizer only
