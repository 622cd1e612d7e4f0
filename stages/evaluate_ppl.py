"""evaluate_ppl: data/model + data/shards + data/tokenizer -> reports/eval.json (DVC metrics).

Exact perplexity and bits per byte on the whole val split, beside the untrained model's and a
unigram model's (see tinylm/evaluate.py for the windows and the byte accounting).
"""
from pathlib import Path

import numpy as np
import torch

from tinylm.tokenizer.bpe import load_tokenizer
from tinylm.config import load_params
from tinylm.evaluate import check_spells_text, evaluate
from tinylm.model import load_trained_model
from tinylm.corpus.shards import load_split
from tinylm.errors import run_stage
from tinylm.records.io import write_record

# Reads, then writes.
MODEL, SHARDS, TOKENIZER, VAL_TEXT = (Path(p) for p in ("data/model", "data/shards", "data/tokenizer",
                                                        "data/clean/val.txt"))
REPORT = Path("reports/eval.json")


def main() -> None:
    params = load_params()
    tokenizer = load_tokenizer(TOKENIZER)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_trained_model(MODEL, tokenizer.fingerprint, device)
    val_tokens = np.concatenate(load_split(SHARDS, "val", tokenizer.fingerprint))
    check_spells_text(val_tokens, tokenizer, VAL_TEXT)
    train_tokens = load_split(SHARDS, "train", tokenizer.fingerprint)
    report = evaluate(model, val_tokens, train_tokens, tokenizer, params.eval.stride, params.eval.batch_size,
                      init_seed=params.train.seed)
    write_record(REPORT, report)
    print(f"evaluate_ppl: {report.tokens_evaluated:,} val tokens | loss {report.val_loss:.4f} | "
          f"ppl {report.val_ppl:.2f} | bpb {report.val_bpb:.4f} | untrained ppl "
          f"{report.baselines.untrained.ppl:.1f} | unigram ppl {report.baselines.unigram.ppl:.1f} -> {REPORT}")


if __name__ == "__main__":
    run_stage(main)
