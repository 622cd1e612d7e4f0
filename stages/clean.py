"""clean: data/raw/{train,val}.jsonl -> data/clean/{train,val}.txt + reports/clean.json."""
from pathlib import Path

from tinylm.corpus.clean import SplitReport, clean_split, digest
from tinylm.config import load_params
from tinylm.corpus.formats import read_raw_split, write_eot_stories
from tinylm.errors import run_stage
from tinylm.records.clean import CleanReport
from tinylm.records.io import write_record

RAW, CLEAN = Path("data/raw"), Path("data/clean")


def main() -> None:
    params = load_params()
    special_tokens = params.tokenizer.special_tokens
    train, val = SplitReport(), SplitReport()
    # Validation first: train stories that also appear there are dropped from train (no leakage).
    val_digests: set[bytes] = set()

    def remember(stories):
        for story in stories:
            val_digests.add(digest(story))
            yield story

    write_eot_stories(CLEAN / "val.txt", remember(
        clean_split(read_raw_split(RAW / "val.jsonl"), params.clean, special_tokens, val)))
    write_eot_stories(CLEAN / "train.txt", clean_split(
        read_raw_split(RAW / "train.jsonl"), params.clean, special_tokens, train, exclude=val_digests))
    report = CleanReport(train=train.record(), val=val.record())
    write_record("reports/clean.json", report)
    for split, counts in (("train", report.train), ("val", report.val)):
        print(f"clean: {split}: {counts.stories_in} in, {counts.stories_out} out, "
              f"{counts.mojibake_repaired} repaired, dropped {counts.dropped}")


if __name__ == "__main__":
    run_stage(main)
