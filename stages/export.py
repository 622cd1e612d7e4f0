"""export: data/model + data/tokenizer -> data/export/hf/, the model as a Hugging Face transformers model.

`AutoModelForCausalLM.from_pretrained("data/export/hf")` and `AutoTokenizer.from_pretrained(...)` load it
with no custom code (tinylm/export/hf_model.py maps our options onto GPT-2, GPT-NeoX, Llama, Qwen3, Arcee
or Apertus, and checks transformers' logits equal ours before the directory is replaced). A model with an
option no architecture computes (a logit soft-cap, ...) is not an error: data/export/hf/ then holds only
EXPORT_SKIPPED.txt saying which option, so the stage still produces its output and `dvc repro` goes on.
"""
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from tinylm.errors import run_stage
from tinylm.export.hf_model import SKIPPED, NotExportable, export_hf, write_skipped
from tinylm.model import load_trained_model
from tinylm.records.environment import FILE as ENVIRONMENT, check_environment, current_environment
from tinylm.records.io import write_record
from tinylm.tokenizer.bpe import load_tokenizer

TOKENIZER, MODEL, OUT = Path("data/tokenizer"), Path("data/model"), Path("data/export/hf")


def main() -> None:
    environment = current_environment()
    check_environment("export", environment)
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per check: noise in a stage's log
    tokenizer = load_tokenizer(TOKENIZER)
    # On the CPU whatever the machine: the weights are copied as they are, and the check compares fp32 logits.
    model = load_trained_model(MODEL, tokenizer.fingerprint, torch.device("cpu"))
    try:
        model_type = export_hf(model, tokenizer, OUT)
    except NotExportable as exc:
        write_skipped(OUT, exc)
        print(f"export: {exc}. Wrote {OUT / SKIPPED} instead.")
        return
    write_record(OUT / ENVIRONMENT, environment)  # the versions that wrote config.json's transformers_version
    print(f"export: {model_type} model + fast tokenizer -> {OUT} (transformers' logits checked equal to ours)")


if __name__ == "__main__":
    run_stage(main)
