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


def written_by(stage: str, *paths: str) -> tuple[Source, ...]:
    return tuple(Source(Path(path), stage) for path in paths)


# What the report reads, grouped by the stage that writes it.
(PROVENANCE,) = written_by("download", "data/raw/provenance.json")
CLEAN, CLEAN_VAL = written_by("clean", "reports/clean.json", "data/clean/val.txt")
TOKENIZER_REPORT, TOKENIZER_DIR = written_by("train_bpe", "reports/tokenizer.json", "data/tokenizer")
(SHARDS,) = written_by("encode_shards", "reports/shards.json")
MODEL_DIR, MODEL_SUMMARY, TRAIN_METRICS, TRAIN_PLOTS, TRAIN_SAMPLES = written_by(
    "pretrain", "data/model", "data/model/model.json", "reports/train/metrics.json", "reports/train/plots/metrics",
    "reports/train/samples.jsonl")
(EVAL,) = written_by("evaluate_ppl", "reports/eval.json")
SAMPLING, SAMPLES = written_by("sample_sweep", "reports/sampling.json", "reports/samples.jsonl")
(MODEL_ENVIRONMENT,) = written_by("pretrain", "data/model/environment.json")


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
