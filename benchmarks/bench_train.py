"""Trainer throughput (tokens/s, MFU) on the params.yaml model and batch, and the cost of a checkpoint.

Variants, each a full `Trainer.train_step` (sample, forward, backward, clip, AdamW) on random ids
(throughput does not depend on what the ids say):
- eager fp32: the CPU default, the reference the others are divided by;
- torch.compile fp32 (compiled once, outside the timings; the compile time is printed);
- eager bf16 autocast (CPUs with AVX512-BF16 run bf16 matmuls at twice the fp32 rate).
Repetitions interleave the variants and keep the best, since other jobs share the cores.
The checkpoint save (model + AdamW state + RNG + history, fsynced and renamed) is timed the same
way and reported in ms and in training steps.

    python benchmarks/bench_train.py [--steps 5] [--rounds 3] [--no-compile]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tinylm.config import load_params
from tinylm.model import GPTConfig
from tinylm.training.progress import model_flops_utilization
from tinylm.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def make_trainer(workdir: Path, name: str, config: GPTConfig, train_params, tokens) -> Trainer:
    return Trainer(config, train_params, tokens, tokens, checkpoint_path=workdir / name / "last.pt",
                   log_dir=workdir / name / "reports", tokenizer_fingerprint="0" * 64)


def seconds_per_step(trainer: Trainer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed repetition")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (best kept)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args()

    params = load_params(REPO / "params.yaml")
    config = GPTConfig.from_params(params.model, params.tokenizer.vocab_size)
    base = dataclasses.replace(params.train, device="cpu", precision="fp32", compile=False,
                               max_steps=10**6, warmup_steps=10)
    tokens = [np.random.default_rng(0).integers(0, config.vocab_size, 2_000_000).astype(np.uint16)]
    variants = {"eager fp32": base}
    if not args.no_compile:
        variants["compile fp32"] = dataclasses.replace(base, compile=True)
    variants["eager bf16 autocast"] = dataclasses.replace(base, precision="bf16")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        trainers = {}
        for name, train_params in variants.items():
            trainers[name] = make_trainer(workdir, name.replace(" ", "_"), config, train_params, tokens)
            start = time.perf_counter()
            trainers[name].train_step()  # warm-up: compiles the graph, fills the allocator
            trainers[name].train_step()
            print(f"{name}: first two steps (warm-up, incl. compilation) {time.perf_counter() - start:.1f} s",
                  flush=True)
        best = {name: float("inf") for name in variants}
        best_save = float("inf")
        reference = trainers["eager fp32"]
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                best[name] = min(best[name], seconds_per_step(trainer, args.steps))
            start = time.perf_counter()
            reference.save_checkpoint()
            best_save = min(best_save, time.perf_counter() - start)
        checkpoint_mb = os.path.getsize(reference.checkpoint_path) / 1e6

    model, first = reference.model, next(iter(variants.values()))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {config.n_layer} layers, {config.n_head} heads, d_model {config.d_model}, block "
          f"{config.block_size}, vocab {config.vocab_size}: {model.num_params():,} parameters "
          f"({model.num_params(False):,} without embeddings); {reference.flops_per_token / 1e6:.1f} MFLOP/token")
    print(f"batch: {first.micro_batch_size} x {first.grad_accum_steps} x {config.block_size} = "
          f"{reference.batch_tokens:,} tokens/step; peak {first.peak_flops:.3g} FLOP/s (train.peak_flops)\n")
    print("| variant | s/step | tokens/s | MFU | vs eager fp32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in best.items():
        tokens_per_s = reference.batch_tokens / seconds
        mfu = model_flops_utilization(reference.flops_per_token, tokens_per_s, first.peak_flops, world_size=1)
        print(f"| {name} | {seconds:.3f} | {tokens_per_s:,.0f} | {mfu:.1%} | {best['eager fp32'] / seconds:.2f}x |")
    print(f"\ncheckpoint save: {best_save * 1e3:.0f} ms for {checkpoint_mb:.1f} MB = "
          f"{best_save / best['eager fp32']:.2f} eager fp32 steps; every {first.checkpoint_interval} steps "
          f"that is {best_save / (best['eager fp32'] * first.checkpoint_interval):.2%} of training time")


if __name__ == "__main__":
    main()
