"""The modern recipe against the GPT-2 baseline: val bits/byte on the same shards, in the same minutes.

Both are composed from conf/ exactly as `dvc exp run` composes them, with `recipe=baseline` (the
CPU default of before the recipes) and `recipe=modern` (the candidate for the new CPU default),
each on the cpu profile. They train one after the other in this process through the pretrain stage's
`Trainer`, on the workspace's data/shards and data/tokenizer (`dvc repro encode_shards` makes
them), and each is scored by evaluate_ppl's exact evaluator over every validation token.

Prints each run's training wall-clock and val bits/byte and their ratio. Exits 1 if the modern
recipe trained longer than the baseline, or if its bits/byte exceed --target times the baseline's
(the target for making it the default: 0.78x of 1.1674, i.e. <= 0.91). Each run takes about ten
minutes on 2 cores.

`--step-times` instead times one training step of the baseline with each recipe axis alone (the
step-time column of the ablation table in benchmarks/README.md; its val bits/byte come from the
`dvc exp run --queue` runs listed there): repetitions interleave the variants and keep the best,
since other jobs share the cores.

    python benchmarks/bench_recipe.py [--target 0.78]
    python benchmarks/bench_recipe.py --step-times [--steps 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tinylm.config import Params, parse_params
from tinylm.corpus.shards import load_split
from tinylm.evaluate import evaluate
from tinylm.model import GPTConfig
from tinylm.tokenizer.bpe import load_tokenizer
from tinylm.training.progress import format_duration
from tinylm.training.trainer import Trainer

from bench_train import make_trainer, seconds_per_step  # the same timed step as the throughput benchmark

REPO = Path(__file__).resolve().parents[1]
RUNS = {"baseline": ["recipe=baseline"], "modern": ["recipe=modern"]}
# Each axis alone on top of the GPT-2 baseline, as the ablation's `dvc exp run -S` flags set it.
AXES = {"baseline": [], "bf16": ["train.precision=bf16"], "rope": ["model.positions=rope"],
        "rmsnorm": ["model.norm=rmsnorm"], "swiglu": ["model.mlp=swiglu"], "relu2": ["model.mlp=relu2"],
        "qk_norm": ["model.qk_norm=true"], "untied": ["model.tie_embeddings=false"], "gqa": ["model.n_kv_head=2"],
        "softcap": ["model.logit_softcap=15"], "no bias": ["model.bias=false"], "muon": ["train.optimizer=muon"]}


def composed(overrides: list[str]) -> Params:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return parse_params(OmegaConf.to_container(compose(config_name="config", overrides=overrides)))


def train_and_score(name: str, params: Params, workdir: Path) -> dict[str, float]:
    tokenizer = load_tokenizer(REPO / "data/tokenizer")
    if tokenizer.vocab_size != params.tokenizer.vocab_size:
        raise SystemExit(f"{name}: data/tokenizer has {tokenizer.vocab_size} ids but tokenizer.vocab_size is "
                         f"{params.tokenizer.vocab_size}; run `dvc repro encode_shards` for these params first")
    train_tokens, val_tokens = (load_split(REPO / "data/shards", split, tokenizer.fingerprint)
                                for split in ("train", "val"))
    config = GPTConfig.from_params(params.model, tokenizer.vocab_size)
    print(f"== {name}: {config}", flush=True)
    started = time.perf_counter()
    trainer = Trainer(config, params.train, train_tokens, val_tokens, checkpoint_path=workdir / name / "last.pt",
                      log_dir=workdir / name / "reports", tokenizer_fingerprint=tokenizer.fingerprint)
    result = trainer.run()
    train_s = time.perf_counter() - started
    score = evaluate(result.model.eval(), np.concatenate(val_tokens), train_tokens, tokenizer, params.eval.stride,
                     params.eval.batch_size, init_seed=params.train.seed)
    print(f"== {name}: {result.steps} steps in {format_duration(train_s)} | val loss {score.val_loss:.4f} | "
          f"val bpb {score.val_bpb:.4f}", flush=True)
    return {"train_s": train_s, "val_bpb": score.val_bpb, "val_loss": score.val_loss, "steps": result.steps,
            "params": result.model.num_params()}


def step_times(steps: int, rounds: int) -> None:
    """Seconds per optimizer step of each axis alone on the baseline, best of `rounds` interleaved."""
    tokens = [np.random.default_rng(0).integers(0, 4096, 500_000).astype(np.uint16)]
    best = dict.fromkeys(AXES, float("inf"))
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, overrides in AXES.items():
            params = composed(["recipe=baseline", *overrides])
            train = dataclasses.replace(params.train, max_steps=10**6)
            config = GPTConfig.from_params(params.model, params.tokenizer.vocab_size)
            trainers[name] = make_trainer(Path(tmp), name.replace(" ", "_"), config, train, tokens)
            trainers[name].train_step()  # first-step allocations (and Muon's one-off setup) left out
        for _ in range(rounds):
            for name, trainer in trainers.items():
                best[name] = min(best[name], seconds_per_step(trainer, steps))
    print("\n| axis alone | s/step | vs baseline |\n|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {seconds / best['baseline']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.78, help="highest allowed bpb ratio modern/baseline")
    parser.add_argument("--step-times", action="store_true", help="time each axis alone instead (no training run)")
    parser.add_argument("--steps", type=int, default=5, help="--step-times: steps per timed repetition")
    parser.add_argument("--rounds", type=int, default=3, help="--step-times: interleaved repetitions (best kept)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    if args.step_times:
        step_times(args.steps, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: train_and_score(name, composed(overrides), Path(tmp)) for name, overrides in RUNS.items()}
    base, new = results["baseline"], results["modern"]
    ratio, time_ratio = new["val_bpb"] / base["val_bpb"], new["train_s"] / base["train_s"]
    print("\n| run | params | steps | training wall-clock | val loss | val bits/byte |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['params']:,} | {r['steps']} | {format_duration(r['train_s'])} ({r['train_s']:.0f} s) "
              f"| {r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
    print(f"\nmodern / baseline: val bpb {ratio:.3f}x (target <= {args.target}x), "
          f"training wall-clock {time_ratio:.3f}x (target <= 1x)")
    if ratio > args.target or time_ratio > 1.0:
        raise SystemExit("target missed")


if __name__ == "__main__":
    main()
