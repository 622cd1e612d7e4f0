"""Generation speed with the KV cache against recomputing the whole context at every step.

The model is the CPU default of params.yaml (model section, tokenizer.vocab_size), randomly
initialised (speed does not depend on the weights). A prompt of `context - new_tokens` random
tokens is extended by `new_tokens` tokens, so the last steps attend over `context` tokens (256 =
block_size by default); no end token, so every run produces exactly new_tokens tokens. Both paths
are `tinylm.generation.sampling.decode` (`use_cache=True` / `False`), the prefill included; they must produce
the same tokens. Rows: greedy on one sequence, and sampling 5 sequences in a batch (the sweep's
shape). Repetitions are interleaved and the best of each kept, since other jobs share the cores.
One thread by default, as the sample_sweep stage runs: decoding is a chain of small ops, and with
a second OpenMP thread each op waits for it whenever another job holds the other core (measured
up to 60x slower on the shared 2-core machine). Target: cached >= 5x uncached tokens/s (exit
code 1 if missed).

    python benchmarks/bench_generate.py [--context 256] [--new-tokens 64] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from tinylm.config import load_params
from tinylm.model import GPT, GPTConfig
from tinylm.generation.sampling import Greedy, Sample, decode

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TARGET_SPEEDUP = 5.0
CASES = {"greedy, 1 sequence": (Greedy(), [0]), "sampling, 5 sequences": (Sample(), [0, 1, 2, 3, 4])}


def decoding_speed(model: GPT, prompt: list[int], strategy: Greedy | Sample, seeds: list[int], new_tokens: int,
                   repeats: int) -> tuple[float, float]:
    """Tokens/s of `decode` with the KV cache and without it (best of `repeats` interleaved runs each);
    ValueError if the two produce different tokens. benchmarks/gpu_check.py reuses it on the GPU."""
    outputs, best = {}, {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for use_cache in (True, False):
            start = time.perf_counter()
            outputs[use_cache] = decode(model, prompt, strategy, new_tokens, None, seeds, use_cache)
            best[use_cache] = min(best[use_cache], time.perf_counter() - start)
    if [g.tokens for g in outputs[True]] != [g.tokens for g in outputs[False]]:
        raise ValueError("the cached and uncached generations differ")
    produced = new_tokens * len(seeds)
    return produced / best[True], produced / best[False]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = load_params(PARAMS)
    config = GPTConfig.from_params(params.model, params.tokenizer.vocab_size)
    if not args.new_tokens < args.context <= config.block_size:
        sys.exit(f"need new_tokens < context <= block_size ({config.block_size})")
    torch.manual_seed(0)
    model = GPT(config).eval()
    prompt = torch.randint(0, config.vocab_size, (args.context - args.new_tokens,)).tolist()
    print(f"model: {config.n_layer} layers, d_model {config.d_model}, vocab {config.vocab_size}, "
          f"{model.num_params():,} params | context {len(prompt)} -> {args.context} tokens | "
          f"{torch.get_num_threads()} thread(s) | {platform.machine()}, {os.cpu_count()} cores")

    failed = False
    for label, (strategy, seeds) in CASES.items():
        try:
            cached, uncached = decoding_speed(model, prompt, strategy, seeds, args.new_tokens, args.repeats)
        except ValueError as exc:
            sys.exit(f"{label}: {exc}")
        speedup = cached / uncached
        failed |= speedup < TARGET_SPEEDUP
        print(f"{label}: KV cache {cached:,.0f} tok/s | no cache {uncached:,.0f} tok/s | "
              f"speedup {speedup:.1f}x (target >= {TARGET_SPEEDUP:g}x)")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
