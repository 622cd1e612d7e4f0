"""clean: data/raw/{train,val}.jsonl -> data/clean/{train,val}.txt + reports/clean.json."""
from pathlib import Path

from tinylm.corpus.clean import SplitReport, clean_split, digest
from tinylm.config import load_params
from tinylm.corpus.formats import read_raw_split, write_eot_stories
from tinylm.files import write_json
from tinylm.errors import run_stage

RAW, CLEAN = Path("data/raw"), Path("data/clean")


def main() -> None:
    params = load_params()
    special_tokens = params.tokenizer.special_tokens
    reports = {"train": SplitReport(), "val": SplitReport()}
    # Validation first: train stories that also appear there are dropped from train (no leakage).
    val_digests: set[bytes] = set()

    def remember(stories):
        for story in stories:
            val_digests.add(digest(story))
            yield story

    write_eot_stories(CLEAN / "val.txt", remember(
        clean_split(read_raw_split(RAW / "val.jsonl"), params.clean, special_tokens, reports["val"])))
    write_eot_stories(CLEAN / "train.txt", clean_split(
        read_raw_split(RAW / "train.jsonl"), params.clean, special_tokens, reports["train"], exclude=val_digests))
    summary = {split: report.as_dict() for split, report in reports.items()}
    write_json("reports/clean.json", summary)
    for split, report in summary.items():
        print(f"clean: {split}: {report['stories_in']} in, {report['stories_out']} out, "
              f"{report['mojibake_repaired']} repaired, dropped {report['dropped']}")


if __name__ == "__main__":
    run_stage(main)
