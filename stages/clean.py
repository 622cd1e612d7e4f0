"""clean: data/raw/{train,val}.jsonl -> data/clean/{train,val}.txt + reports/clean.json.

Stories are cleaned on `clean.workers` processes (the output is the same for any count), with a
progress bar per split in bytes of the raw file.
"""
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from tinylm.config import CleanParams, load_params
from tinylm.corpus.clean import SplitReport, clean_split, digest
from tinylm.corpus.formats import read_raw_split, write_eot_stories
from tinylm.errors import run_stage
from tinylm.records.clean import CleanReport
from tinylm.records.io import write_record

RAW, CLEAN = Path("data/raw"), Path("data/clean")


def cleaned(split: str, params: CleanParams, special_tokens: list[str], report: SplitReport,
            exclude: set[bytes] | None = None) -> Iterator[str]:
    path = RAW / f"{split}.jsonl"
    with tqdm(total=path.stat().st_size if path.is_file() else None, unit="B", unit_scale=True,
              desc=f"clean {split}") as bar:
        stories = read_raw_split(path, progress=lambda done: bar.update(done - bar.n))
        yield from clean_split(stories, params, special_tokens, report, exclude)


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

    write_eot_stories(CLEAN / "val.txt", remember(cleaned("val", params.clean, special_tokens, val)))
    write_eot_stories(CLEAN / "train.txt", cleaned("train", params.clean, special_tokens, train, exclude=val_digests))
    report = CleanReport(train=train.record(), val=val.record())
    write_record("reports/clean.json", report)
    for split, counts in (("train", report.train), ("val", report.val)):
        print(f"clean: {split}: {counts.stories_in} in, {counts.stories_out} out, "
              f"{counts.mojibake_repaired} repaired, dropped {counts.dropped}")


if __name__ == "__main__":
    run_stage(main)
