"""train_bpe stage: learn our byte-level BPE on the clean train split, write data/tokenizer/.

Also writes reports/tokenizer.json (DVC metrics): train time, bytes per token on the validation
split, and the comparisons of tinylm/tokenizer/compare.py (HF tokenizers, GPT-2, other vocab sizes),
which train on at most `tokenizer.compare_max_bytes` of the stories.
"""
from __future__ import annotations

import time
from pathlib import Path

from tinylm.tokenizer.bpe import Tokenizer
from tinylm.tokenizer.compare import tokenizer_report
from tinylm.tokenizer.train import train_bpe
from tinylm.config import load_params
from tinylm.errors import PipelineError, run_stage
from tinylm.records.io import write_record

TRAIN = Path("data/clean/train.txt")
VAL = Path("data/clean/val.txt")
OUT_DIR = Path("data/tokenizer")
REPORT = Path("reports/tokenizer.json")


def main() -> None:
    params = load_params().tokenizer
    for path in (TRAIN, VAL):
        if not path.is_file():
            raise PipelineError(f"{path}: missing; run the clean stage first (dvc repro clean)")

    start = time.perf_counter()
    vocab, merges = train_bpe(TRAIN, params.vocab_size, params.special_tokens, workers=params.workers, progress=True)
    train_seconds = time.perf_counter() - start
    tokenizer = Tokenizer(vocab, merges, params.special_tokens)
    tokenizer.save(OUT_DIR)
    print(f"trained {tokenizer.vocab_size} tokens ({len(merges)} merges) in {train_seconds:.2f}s -> {OUT_DIR}")

    report = tokenizer_report(tokenizer, train_seconds, TRAIN, VAL.read_text(encoding="utf-8"),
                              params.compare_vocab_sizes, params.compare_max_bytes, params.workers)
    write_record(REPORT, report)
    print(f"validation: {report.val_bytes_per_token} bytes/token -> {REPORT}")


if __name__ == "__main__":
    run_stage(main)
