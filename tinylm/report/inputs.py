"""The report's inputs: every file an earlier stage wrote, each with the stage to rerun when it is wrong.

The JSON files are read as their typed records (tinylm/records/): a missing file, one that is not
valid JSON, or one with a missing, unknown or mistyped key is a PipelineError naming the file,
the key and the stage that writes it. So is a missing folder, text file or training series.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tinylm.errors import PipelineError
from tinylm.records.io import read_record, read_records, stage_error

TRAIN_SERIES = ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")
R = TypeVar("R")


@dataclass(frozen=True)
class Source:
    """An input of the report and the stage that writes it."""

    path: Path
    stage: str

    def fail(self, problem: str) -> PipelineError:
        return stage_error(self.path, self.stage, problem)

    def read(self, root: Path, kind: type[R], ignore_other_keys: bool = False) -> R:
        """The JSON file as its record."""
        return read_record(root / self.path, kind, self.stage, ignore_other_keys)

    def read_lines(self, root: Path, kind: type[R]) -> list[R]:
        """The JSON lines file as one record per line."""
        return read_records(root / self.path, kind, self.stage)


CLEAN = Source(Path("reports/clean.json"), "clean")
PROVENANCE = Source(Path("data/raw/provenance.json"), "download")
CLEAN_VAL = Source(Path("data/clean/val.txt"), "clean")
TOKENIZER_REPORT = Source(Path("reports/tokenizer.json"), "train_bpe")
TOKENIZER_DIR = Source(Path("data/tokenizer"), "train_bpe")
SHARDS = Source(Path("reports/shards.json"), "encode_shards")
MODEL_DIR = Source(Path("data/model"), "pretrain")
MODEL_SUMMARY = Source(Path("data/model/model.json"), "pretrain")
TRAIN_METRICS = Source(Path("reports/train/metrics.json"), "pretrain")
TRAIN_PLOTS = Source(Path("reports/train/plots/metrics"), "pretrain")
EVAL = Source(Path("reports/eval.json"), "evaluate_ppl")
SAMPLING = Source(Path("reports/sampling.json"), "sample_sweep")
SAMPLES = Source(Path("reports/samples.jsonl"), "sample_sweep")


@dataclass(frozen=True)
class TrainMetrics:
    """The keys of reports/train/metrics.json that the report uses. dvclive writes that file (the
    pretrain stage's summary and the last value of every logged metric), so its other keys are
    not ours to declare: read it with `ignore_other_keys`."""

    batch_tokens: int  # tokens per optimizer step
    elapsed_s: float  # training time, at the last log


def require(root: Path, source: Source) -> Path:
    path = root / source.path
    if not path.exists():
        raise source.fail("missing")
    return path


def read_series(root: Path, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one dvclive metric: a TSV with a header `step<TAB>name`."""
    source = Source(TRAIN_PLOTS.path / f"{name}.tsv", TRAIN_PLOTS.stage)
    with open(require(root, source), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "step" not in rows[0] or name not in rows[0]:
        raise source.fail(f"expected a header 'step\\t{name}' and at least one row")
    return [int(row["step"]) for row in rows], [float(row[name]) for row in rows]
