"""The corpus stages' records: data/raw/provenance.json (download), reports/clean.json (clean) and
reports/shards.json (encode_shards)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Splits(Generic[T]):
    """One T per split of the corpus."""

    train: T
    val: T


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


@dataclass(frozen=True)
class CleanSplit:
    stories_in: int
    stories_out: int
    mojibake_repaired: int
    dropped: dict[str, int]  # every reason of tinylm.corpus.clean.DROP_REASONS -> stories dropped for it


# reports/clean.json: what the clean stage kept, repaired and dropped, per split.
CleanReport = Splits[CleanSplit]


@dataclass(frozen=True)
class ShardSplit:
    documents: int
    tokens: int  # <|endoftext|> included
    text_bytes: int
    bytes_per_token: float  # text bytes per token of text (the <|endoftext|> separators are not text)
    shards: int
    seconds: float
    mb_per_s: float


@dataclass(frozen=True)
class CheckedShardSplit(ShardSplit):
    checked_documents: int  # stories whose ids were compared with Tokenizer.encode's (every one)


@dataclass(frozen=True)
class ShardsReport:
    """reports/shards.json: the token shards of each split; validation's ids are checked against the
    from-scratch encoder, train's (the long one) are not."""

    vocab_size: int
    train: ShardSplit
    val: CheckedShardSplit
