"""download: the first usable source in data.sources -> data/raw/{train,val}.jsonl + provenance.json."""
from pathlib import Path

from tinylm.config import load_params
from tinylm.corpus.sources import download
from tinylm.errors import run_stage


def main() -> None:
    params = load_params()
    download(params.data, Path("data/raw"))


if __name__ == "__main__":
    run_stage(main)
