"""The optimizers of a run, stepped as one: AdamW alone (train.optimizer: adamw, GPT-2's recipe), or
Muon for the blocks' 2-D weight matrices beside AdamW for everything else (train.optimizer: muon).

Muon (Jordan et al., 2024; `torch.optim.Muon`) replaces a matrix's momentum-averaged gradient by the
nearest semi-orthogonal matrix (five Newton-Schulz iterations), so every direction of the update
moves by about the same amount instead of a few dominant ones taking the whole step. It is made
for hidden matrices only: the attention projections (the fused q/k/v matrix counts as one) and
the MLP's matrices. Embeddings, an untied LM head, norm gains and biases are not such maps and
stay with AdamW.

Learning rates: both follow the same warmup + cosine schedule (trainer.lr_at). AdamW's groups get
lr_at(step) itself; Muon's gets lr_at(step) * train.muon_lr / train.lr, so train.muon_lr is
Muon's peak lr. torch's default lr adjustment scales each matrix's step by sqrt(max(1, rows/cols)).

Weight decay: AdamW decays the embeddings and the head by train.weight_decay (never norm gains or
biases). Muon's decay is decoupled too: each step shrinks its matrices by (scheduled Muon lr) x
train.muon_weight_decay before the orthogonal update, independent of train.weight_decay.
"""
from __future__ import annotations

from typing import Any

import torch

from tinylm.config import TrainParams
from tinylm.model import GPT


def muon_matrices(model: GPT) -> list[torch.nn.Parameter]:
    """The hidden 2-D weight matrices Muon updates: every block's attention and MLP weights."""
    return [p for p in model.blocks.parameters() if p.dim() == 2]


class Optimizers:
    """One AdamW, and a Muon when train.optimizer is muon, driven as a single optimizer."""

    def __init__(self, model: GPT, train: TrainParams, device_type: str):
        self.train = train
        hidden = {id(p) for p in muon_matrices(model)} if train.optimizer == "muon" else set()
        rest = [p for p in model.parameters() if id(p) not in hidden]  # a tied tensor appears once
        # Weight decay only on matrices (>= 2-D: linear weights, embeddings), not biases or norm gains.
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": train.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        self.adamw = torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2),
                                       fused=device_type == "cuda")
        self.muon = None
        if hidden:
            self.muon = torch.optim.Muon([p for p in model.parameters() if id(p) in hidden], lr=train.muon_lr,
                                         momentum=train.muon_momentum, weight_decay=train.muon_weight_decay)

    @property
    def all(self) -> list[torch.optim.Optimizer]:
        return [self.adamw] if self.muon is None else [self.adamw, self.muon]

    def zero_grad(self) -> None:
        for optimizer in self.all:
            optimizer.zero_grad(set_to_none=True)

    def set_lr(self, adamw_lr: float) -> None:
        """This step's lr: AdamW's from the schedule, Muon's scaled by train.muon_lr / train.lr."""
        for group in self.adamw.param_groups:
            group["lr"] = adamw_lr
        if self.muon is not None:
            for group in self.muon.param_groups:
                group["lr"] = adamw_lr * self.train.muon_lr / self.train.lr

    def unscale(self, scaler: torch.amp.GradScaler) -> None:
        for optimizer in self.all:
            scaler.unscale_(optimizer)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        for optimizer in self.all:
            scaler.step(optimizer)
        scaler.update()

    def state_dict(self) -> dict[str, Any]:
        state = {"adamw": self.adamw.state_dict()}
        if self.muon is not None:
            state["muon"] = self.muon.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adamw.load_state_dict(state["adamw"])
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
