"""The report's inputs: every file an earlier stage wrote, each with the stage to rerun when it is wrong.

A missing input, one that is not valid JSON, or one without an expected key is a PipelineError
naming the file and the stage that writes it.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.errors import PipelineError

TRAIN_SERIES = ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")


@dataclass(frozen=True)
class Source:
    """An input of the report and the stage that writes it."""

    path: Path
    stage: str

    def fail(self, problem: str) -> PipelineError:
        return PipelineError(f"{self.path}: {problem}. It is written by the {self.stage} stage; "
                             f"fix: run `dvc repro {self.stage}`")


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


class Record(dict):
    """A JSON object that, asked for a key it lacks, names its file and the stage to rerun."""

    def __init__(self, items: dict, source: Source):
        super().__init__(items)
        self.source = source

    def __missing__(self, key: str) -> Any:
        raise self.source.fail(f"has no key {key!r} (written by an older or different version of the stage)")


def require(root: Path, source: Source) -> Path:
    path = root / source.path
    if not path.exists():
        raise source.fail("missing")
    return path


def _parse_json(text: str, source: Source) -> Any:
    try:
        return json.loads(text, object_hook=lambda items: Record(items, source))
    except ValueError as exc:
        raise source.fail(f"not valid JSON ({exc})") from None


def read_json(root: Path, source: Source) -> Record:
    return _parse_json(require(root, source).read_text(encoding="utf-8"), source)


def read_jsonl(root: Path, source: Source) -> list[Record]:
    lines = require(root, source).read_text(encoding="utf-8").splitlines()
    return [_parse_json(line, source) for line in lines if line.strip()]


def read_series(root: Path, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one dvclive metric: a TSV with a header `step<TAB>name`."""
    source = Source(TRAIN_PLOTS.path / f"{name}.tsv", TRAIN_PLOTS.stage)
    with open(require(root, source), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "step" not in rows[0] or name not in rows[0]:
        raise source.fail(f"expected a header 'step\\t{name}' and at least one row")
    return [int(row["step"]) for row in rows], [float(row[name]) for row in rows]
