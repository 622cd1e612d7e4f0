"""sample_sweep: data/model + data/tokenizer -> reports/samples.jsonl + reports/sampling.json (DVC metrics).

Every decoding strategy of params.sample on every prompt (see tinylm/generation/sweep.py): one JSON line per
sample (config, strategy params, prompt, seed, completion), and per config its diversity,
repetition, entropy, length and the model's perplexity of its own samples.
"""
from pathlib import Path

import torch

from tinylm.tokenizer.bpe import load_tokenizer
from tinylm.config import load_params
from tinylm.model import load_trained_model
from tinylm.errors import run_stage
from tinylm.generation.sweep import run_sweep
from tinylm.records.io import write_record, write_records

TOKENIZER, MODEL = Path("data/tokenizer"), Path("data/model")
SAMPLES, METRICS = Path("reports/samples.jsonl"), Path("reports/sampling.json")


def main() -> None:
    params = load_params()
    tokenizer = load_tokenizer(TOKENIZER)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Decoding runs ops of microseconds on a handful of rows: a second OpenMP thread gains nothing,
        # and when another process holds the other core every op waits for it (measured 10-40x slower).
        torch.set_num_threads(1)
    model = load_trained_model(MODEL, tokenizer.fingerprint, device)
    records, metrics = run_sweep(model, tokenizer, params.sample)
    write_records(SAMPLES, records)
    write_record(METRICS, metrics)
    print(f"sample_sweep: {len(records)} samples from {len(metrics)} configs -> {SAMPLES}, {METRICS}")


if __name__ == "__main__":
    run_stage(main)
