"""download: the first usable source in data.sources -> data/raw/{train,val}.jsonl + provenance.json."""
import os
from pathlib import Path

from tinylm.config import load_params
from tinylm.corpus.sources import download
from tinylm.errors import run_stage

# `datasets` imports torch when it can, to offer torch-formatted rows this stage never asks for:
# 190 MB of memory and 1.5 s before the first story. Set before `datasets` is imported.
os.environ.setdefault("USE_TORCH", "0")


def main() -> None:
    params = load_params()
    download(params.data, Path("data/raw"))


if __name__ == "__main__":
    run_stage(main)
