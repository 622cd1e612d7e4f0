"""data/raw/provenance.json, written by the download stage."""
from __future__ import annotations

from dataclasses import dataclass

from tinylm.records.splits import Splits


@dataclass(frozen=True)
class DownloadedSplit:
    stories: int
    bytes: int  # of data/raw/{split}.jsonl
    sha256: str  # of data/raw/{split}.jsonl


@dataclass(frozen=True)
class Provenance:
    """data/raw/provenance.json: the source download read, and what it wrote from it."""

    source: str  # the data.sources entry, as written in params.yaml
    kind: str  # "hub", "folder" or "files"
    revision: str | None  # the hub dataset's commit; None for a local source
    source_sha256: dict[str, str] | None  # every local file read -> its sha256; None for the hub
    splits: Splits[DownloadedSplit]
