"""The cost of the stories sampled at milestones during training, on the CPU default of params.yaml.

Times `tinylm.training.milestones.sample_milestone`, the call the trainer makes at each milestone
(every prompt of train.sample_prompts, greedy and min-p, train.sample_tokens new tokens each), on
the model of a `Trainer` of params.yaml (randomly initialised, tokenizer from data/tokenizer),
interleaved with that trainer's own optimizer steps (bench_train's timed step, on random ids), so
both are measured under the same load of the shared cores; medians are kept. A random model never
ends its story, so every continuation runs to the full length: an upper bound for a trained one,
which may stop at <|endoftext|>. torch keeps its default thread count, as the pretrain stage runs
(sampling itself decodes on one thread). The share is the run's milestones (train.max_steps,
train.sample_interval) times the seconds per milestone, over train.max_steps timed steps (the
training alone, no evaluation: an upper bound of the share), and over the committed run's
wall-clock (reports/train/metrics.json elapsed_s). Target: under 3% (exit code 1 if missed).
--torch-threads decodes on torch's thread count instead: what the one-thread choice avoids.

    python benchmarks/bench_milestones.py [--rounds 7] [--steps 3] [--torch-threads]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_train import make_trainer, seconds_per_step  # the same timed step as the throughput benchmark
from tinylm.config import load_params
from tinylm.model import GPTConfig
from tinylm.tokenizer.bpe import load_tokenizer
from tinylm.training import milestones as milestones_module
from tinylm.training.milestones import is_milestone, sample_milestone

ROOT = Path(__file__).resolve().parents[1]
TARGET_SHARE = 0.03


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved repetitions (medians kept)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repetition")
    parser.add_argument("--torch-threads", action="store_true", help="decode on torch's threads, not one")
    args = parser.parse_args()
    if args.torch_threads:
        milestones_module.single_thread = lambda device: contextlib.nullcontext()

    params = load_params(ROOT / "params.yaml")
    train = params.train
    if not (ROOT / "data/tokenizer").is_dir():
        sys.exit("data/tokenizer is missing: run `dvc pull` or `dvc repro train_bpe` first")
    tokenizer = load_tokenizer(ROOT / "data/tokenizer")
    committed_seconds = json.loads((ROOT / "reports/train/metrics.json").read_text())["elapsed_s"]
    config = GPTConfig.from_params(params.model, tokenizer.vocab_size)
    tokens = [np.random.default_rng(0).integers(0, config.vocab_size, 500_000).astype(np.uint16)]
    timed = dataclasses.replace(train, max_steps=10**6, warmup_steps=10)  # the schedule never ends mid-timing

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(Path(tmp), "milestones", config, timed, tokens)
        model = trainer.model
        print(f"model: {config.n_layer} layers, d_model {config.d_model}, vocab {config.vocab_size}, "
              f"{model.num_params():,} params, {trainer.precision} | {len(train.sample_prompts)} prompt(s) x 2 "
              f"strategies x {train.sample_tokens} tokens | torch threads {torch.get_num_threads()}, decoding on "
              f"{'those' if args.torch_threads else 'one'} | "
              f"{platform.machine()}, {os.cpu_count()} cores", flush=True)
        seconds_per_step(trainer, 2)  # warm-up: fills the allocator
        step_seconds, sample_seconds = [], []
        for round_ in range(args.rounds):
            step_seconds.append(seconds_per_step(trainer, args.steps))
            start = time.perf_counter()
            rows = sample_milestone(model, tokenizer, train.sample_prompts, train.sample_tokens, train.seed, round_)
            sample_seconds.append(time.perf_counter() - start)
    new_tokens = sum(row.tokens for row in rows)
    per_milestone, per_step = statistics.median(sample_seconds), statistics.median(step_seconds)
    milestones = sum(is_milestone(step, train) for step in range(train.max_steps + 1))
    sampling = milestones * per_milestone
    share, committed_share = sampling / (train.max_steps * per_step), sampling / committed_seconds
    print(f"per milestone: {per_milestone:.3f} s median ({min(sample_seconds):.3f}-{max(sample_seconds):.3f} s), "
          f"{new_tokens} tokens, {new_tokens / per_milestone:,.0f} tok/s | per training step: {per_step:.3f} s "
          "median")
    print(f"run: {milestones} milestones (max_steps {train.max_steps}, sample_interval {train.sample_interval}) "
          f"= {sampling:.1f} s = {share:.2%} of {train.max_steps} steps at this load "
          f"({train.max_steps * per_step:.0f} s), {committed_share:.2%} of the committed run's "
          f"{committed_seconds:.0f} s (target < {TARGET_SHARE:.0%})")
    if share >= TARGET_SHARE:
        sys.exit(1)


if __name__ == "__main__":
    main()
