"""Tiny training setups shared by the trainer tests (a module, not a conftest: only these tests use it)."""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from tinylm.config import TrainParams
from tinylm.model import GPTConfig
from tinylm.training.trainer import Trainer, TrainResult

VOCAB = 61
CONFIG = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, d_model=32, dropout=0.0, bias=True)
TOKENIZER_FINGERPRINT = "ab" * 32


def params(**overrides) -> TrainParams:
    values = dict(seed=3, device="cpu", precision="fp32", compile=False, activation_checkpointing=False,
                  micro_batch_size=4, grad_accum_steps=1, nproc_per_node=1, nnodes=1, rdzv_endpoint="127.0.0.1:0",
                  max_steps=16, lr=3e-3, min_lr_ratio=0.1, warmup_steps=3,
                  weight_decay=0.1, beta1=0.9, beta2=0.95, optimizer="adamw", muon_lr=0.02, muon_momentum=0.95,
                  muon_weight_decay=0.0, grad_clip=1.0, eval_interval=5, eval_batches=2,
                  sample_interval=0, sample_prompts=["Once upon a time"], sample_tokens=8, log_interval=1,
                  checkpoint_interval=4, peak_flops=1e12)
    values.update(overrides)
    result = TrainParams(**values)
    result.check("train")
    return result


def markov_tokens(n: int, seed: int) -> np.ndarray:
    """Mostly-predictable ids (next = 3 * prev + 1 mod VOCAB, 20% random) so the loss can fall."""
    rng = np.random.default_rng(seed)
    tokens = np.empty(n, dtype=np.uint16)
    tokens[0] = 0
    noise = rng.integers(0, VOCAB, n)
    keep = rng.random(n) < 0.8
    for i in range(1, n):
        tokens[i] = (3 * int(tokens[i - 1]) + 1) % VOCAB if keep[i] else noise[i]
    return tokens


TRAIN = [markov_tokens(3000, 1), markov_tokens(1500, 2)]
VAL = [markov_tokens(800, 3)]


def make_trainer(run_dir: Path, train_params: TrainParams, config: GPTConfig = CONFIG, **kwargs) -> Trainer:
    return Trainer(config, train_params, TRAIN, VAL, checkpoint_path=run_dir / "ckpt" / "last.pt",
                   log_dir=run_dir / "reports", tokenizer_fingerprint=TOKENIZER_FINGERPRINT, **kwargs)


def run(run_dir: Path, train_params: TrainParams, config: GPTConfig = CONFIG) -> TrainResult:
    return make_trainer(run_dir, train_params, config).run()


def logged(run_dir: Path, name: str) -> dict[int, float]:
    """One metric's history as dvclive wrote it: {step: value}; a repeated step fails the test."""
    path = run_dir / "reports" / "plots" / "metrics" / f"{name}.tsv"
    with open(path, newline="") as f:
        rows = [(int(r["step"]), float(r[name])) for r in csv.DictReader(f, delimiter="\t")]
    steps = [s for s, _ in rows]
    assert len(steps) == len(set(steps)), f"{path} repeats steps: {steps}"
    return dict(rows)


def replace(train_params: TrainParams, **changes) -> TrainParams:
    return dataclasses.replace(train_params, **changes)
