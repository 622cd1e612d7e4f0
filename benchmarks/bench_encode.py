"""Encoding throughput (MB/s of UTF-8 text) of our encoders against tiktoken `gpt2`, in one process.

Contenders, all on the same text (the shared validation sample repeated to ~4 MB, stories
separated by `<|endoftext|>` lines):
- tiktoken `gpt2` (`encode`, special tokens allowed): the reference;
- the from-scratch `Tokenizer.encode`, with our 4096-token BPE trained on the shared train sample
  and with GPT-2's own merges; each repetition gets a fresh Tokenizer, so its pre-token cache
  starts empty (the repeated copies then hit it, as the recurring words of any corpus do);
- the encode_shards engine (`ParallelEncoder`: split into stories, encode, each story then
  <|endoftext|>, as uint16 arrays) with 1 process and with `--workers` processes (the pool is
  started once, outside the timings; its start-up is printed separately).
Repetitions are interleaved and the best of each is kept, since other jobs share the cores.
Targets: from-scratch >= 0.2x tiktoken, engine >= 1.0x tiktoken (exit code 1 if missed).

    TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache python benchmarks/bench_encode.py
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))

import numpy as np  # noqa: E402
import tiktoken  # noqa: E402

from tinylm.tokenizer.bpe import EOT, Tokenizer, load_gpt2
from tinylm.tokenizer.train import train_bpe  # noqa: E402
from tinylm.corpus.formats import EOT_LINE  # noqa: E402
from tinylm.corpus.parallel import chunks  # noqa: E402
from tinylm.tokenizer.fast_encode import ParallelEncoder  # noqa: E402

SEPARATOR = f"\n{EOT_LINE}\n"


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def best_rates(contenders: dict, megabytes: float, repeats: int) -> dict[str, float]:
    """Each contender returns the seconds of its timed part; repetitions interleave the contenders."""
    best = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, measure in contenders.items():
            best[name] = min(best[name], measure())
    return {name: megabytes / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    sample = (SHARED / "data/tinystories/TinyStories-valid-sample.txt").read_text(encoding="utf-8")
    text = sample * max(1, round(args.megabytes * 1e6 / len(sample.encode("utf-8"))))
    megabytes = len(text.encode("utf-8")) / 1e6
    reference = tiktoken.get_encoding("gpt2")
    vocab, merges = train_bpe(SHARED / "data/tinystories/TinyStories-train-sample.txt", 4096, [EOT])
    ours, gpt2 = Tokenizer(vocab, merges, [EOT]), load_gpt2(SHARED / "tiktoken-cache")

    def documents() -> list[str]:
        return text.removesuffix(SEPARATOR).split(SEPARATOR)

    def engine(encoder: ParallelEncoder):
        return lambda: np.concatenate([b.ids for b in encoder.map(chunks(documents()))])

    def fresh(tokenizer: Tokenizer) -> Tokenizer:
        return Tokenizer(tokenizer.vocab, tokenizer.merges, [EOT])

    # Same ids first: a fast wrong answer is no answer.
    assert fresh(gpt2).encode(text) == reference.encode(text, allowed_special="all")
    start = time.perf_counter()
    with ParallelEncoder(ours, 1) as one, ParallelEncoder(ours, args.workers) as many, \
            ParallelEncoder(gpt2, args.workers) as many_gpt2:
        list(many.map([["warm-up"]]))
        startup = time.perf_counter() - start
        expected = [i for d in documents() for i in [*ours.encode(d), ours.eot_id]]
        np.testing.assert_array_equal(engine(many)(), expected)
        gpt2_expected = [i for d in documents() for i in [*reference.encode_ordinary(d), reference.eot_token]]
        np.testing.assert_array_equal(engine(many_gpt2)(), gpt2_expected)

        def from_scratch(tokenizer: Tokenizer):
            def measure() -> float:
                cold = fresh(tokenizer)  # built outside the timing; its pre-token cache starts empty
                return timed(lambda: cold.encode(text))
            return measure

        rates = best_rates({
            "tiktoken gpt2 (reference)": lambda: timed(lambda: reference.encode(text, allowed_special="all")),
            "from-scratch Tokenizer.encode, ours 4096": from_scratch(ours),
            "from-scratch Tokenizer.encode, GPT-2 merges": from_scratch(gpt2),
            "engine, ours 4096, 1 process": lambda: timed(engine(one)),
            f"engine, ours 4096, {args.workers} processes": lambda: timed(engine(many)),
            f"engine, GPT-2 merges, {args.workers} processes": lambda: timed(engine(many_gpt2)),
        }, megabytes, args.repeats)

    base = rates["tiktoken gpt2 (reference)"]
    print(f"{platform.machine()}, {os.cpu_count()} CPUs; {megabytes:.2f} MB of text, "
          f"best of {args.repeats} interleaved; engine pool start-up {startup:.2f} s (once per stage run)")
    print("| encoder | MB/s | x tiktoken |\n| --- | ---: | ---: |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x |")
    scratch = rates["from-scratch Tokenizer.encode, ours 4096"] / base
    fast = rates[f"engine, ours 4096, {args.workers} processes"] / base
    print(f"targets: from-scratch {scratch:.2f}x (>= 0.2x) {'met' if scratch >= 0.2 else 'MISSED'}; "
          f"engine {fast:.2f}x (>= 1.0x) {'met' if fast >= 1.0 else 'MISSED'}")
    if scratch < 0.2 or fast < 1.0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
