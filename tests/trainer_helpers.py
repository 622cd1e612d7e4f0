"""Tiny training setups shared by the trainer tests (a module, not a conftest: only these tests use it):
the tiny model and data, the resume harness, and the pretrain stage's working directory."""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from tinylm.config import TrainParams
from tinylm.corpus.shards import write_shard
from tinylm.model import GPTConfig
from tinylm.tokenizer.bpe import Tokenizer
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


RESUME_PARAMS = params(max_steps=18, eval_interval=5, log_interval=1, checkpoint_interval=4)
METRICS = ("train_loss", "val_loss", "lr", "grad_norm", "tokens")


def dropout_config():
    """Dropout on, so the restored RNG state matters as much as the weights and the batch generator."""
    return dataclasses.replace(CONFIG, dropout=0.1)


def after_step(monkeypatch, at_step: int, action) -> None:
    """Run `action(trainer)` right after optimizer update number `at_step` (once)."""
    original = Trainer.train_step
    fired = []

    def wrapped(self):
        stats = original(self)
        if stats.step == at_step and not fired:
            fired.append(True)
            action(self)
        return stats

    monkeypatch.setattr(Trainer, "train_step", wrapped)


def assert_same_history(reference_dir, resumed_dir) -> float:
    largest = 0.0
    for name in METRICS:
        expected, got = logged(reference_dir, name), logged(resumed_dir, name)
        assert got.keys() == expected.keys(), name
        largest = max(largest, max(abs(expected[s] - got[s]) for s in expected))
    assert largest <= 1e-4
    return largest


STAGE_MAX_STEPS = 300


@pytest.fixture
def workdir(tmp_path, repo_root, shared_dir):
    """A stage working directory: params.yaml with a tiny model, data/tokenizer, data/shards."""
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["model"].update(n_layer=1, n_head=2, d_model=16, block_size=32)
    params["eval"]["stride"] = 32  # must fit in block_size
    params["train"].update(micro_batch_size=4, max_steps=STAGE_MAX_STEPS, warmup_steps=5, eval_interval=100,
                           eval_batches=2, log_interval=1, checkpoint_interval=50)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    tokenizer.save(tmp_path / "data" / "tokenizer")
    text = (shared_dir / "data" / "tinystories" / "TinyStories-valid-sample.txt").read_text()[:40_000]
    for split, part in (("train", text[:30_000]), ("val", text[30_000:])):
        ids = np.array(tokenizer.encode(part), dtype=np.uint16)
        write_shard(tmp_path / "data" / "shards" / f"{split}_0000.bin", ids, tokenizer.vocab_size, tokenizer.fingerprint)
    return tmp_path
