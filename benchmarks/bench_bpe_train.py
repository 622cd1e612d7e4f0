"""BPE training wall time: our from-scratch `train_bpe` against HF `tokenizers`' BpeTrainer.

Both train byte-level BPE with GPT-2's pre-tokenizer and `<|endoftext|>` as special token, on
the same file (the shared train sample, 4.5 MB) and vocab size (4096, 8192), reading the file
themselves; both use `--workers` cores (HF through its Rayon pool). Repetitions are interleaved
and the best of each kept, since other jobs share the cores. Target: ours <= 3x HF (exit code 1
if missed).

Also: peak memory of ours (max RSS of a fresh process running train_bpe, and of its largest
worker), and the time on the text repeated 4x and 16x to show how counting scales. Repeated
text has the same distinct pre-tokens, so the merge loop costs the same at every scale: the
growth is the streaming pre-token count alone, and memory should stay flat.

    python benchmarks/bench_bpe_train.py [--repeats 3] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from tinylm.tokenizer.bpe import EOT
from tinylm.tokenizer.train import train_bpe

TRAIN = Path(__file__).resolve().parents[2] / "shared/data/tinystories/TinyStories-train-sample.txt"
TARGET_RATIO = 3.0


def train_hf(path: Path, vocab_size: int) -> None:
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(path)], trainer)


def best_times(contenders: dict, repeats: int) -> dict[str, float]:
    best = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def peak_memory_mib(path: Path, vocab_size: int, workers: int) -> tuple[float, float, float]:
    """(RSS after imports, peak RSS of the training process, peak RSS of its largest worker).

    The process's own peak is VmHWM, which starts afresh at exec (ru_maxrss would carry over
    this benchmark's own size from the fork); its workers report ru_maxrss through RUSAGE_CHILDREN.
    """
    code = (
        "import re, resource, sys\n"
        "from tinylm.tokenizer.train import train_bpe\n"
        "def hwm(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "base = hwm()\n"
        f"train_bpe(sys.argv[1], {vocab_size}, ['{EOT}'], workers={workers})\n"
        "print(base, hwm(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return tuple(int(kib) / 1024 for kib in out.stdout.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scales", type=int, nargs="*", default=[4, 16])
    args = parser.parse_args()
    size_mb = TRAIN.stat().st_size / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"input {TRAIN.name} ({size_mb:.2f} MB); best of {args.repeats}, workers {args.workers}\n")

    print("| vocab | ours (s) | HF BpeTrainer (s) | ours / HF |\n|---|---|---|---|")
    worst = 0.0
    for vocab_size in (4096, 8192):
        best = best_times({
            "ours": lambda: train_bpe(TRAIN, vocab_size, [EOT], workers=args.workers),
            "hf": lambda: train_hf(TRAIN, vocab_size),
        }, args.repeats)
        ratio = best["ours"] / best["hf"]
        worst = max(worst, ratio)
        print(f"| {vocab_size} | {best['ours']:.2f} | {best['hf']:.2f} | {ratio:.2f}x |")

    print("\n| input | ours (s) | HF (s) | ours MB/s | RSS after imports (MiB) | peak RSS (MiB) | peak worker RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    text = TRAIN.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        for scale in [1, *args.scales]:
            path = Path(tmp) / f"train_x{scale}.txt"
            path.write_bytes(text * scale)
            best = best_times({
                "ours": lambda: train_bpe(path, 4096, [EOT], workers=args.workers),
                "hf": lambda: train_hf(path, 4096),
            }, 1 if scale > 4 else 2)
            base, peak, worker = peak_memory_mib(path, 4096, args.workers)
            print(f"| {scale}x ({size_mb * scale:.0f} MB), vocab 4096 | {best['ours']:.2f} | {best['hf']:.2f} | "
                  f"{size_mb * scale / best['ours']:.1f} | {base:.0f} | {peak:.0f} | {worker:.0f} |")
            path.unlink()

    print(f"\nworst ratio {worst:.2f}x (target <= {TARGET_RATIO}x)")
    if worst > TARGET_RATIO:
        sys.exit(1)


if __name__ == "__main__":
    main()
