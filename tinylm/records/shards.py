"""reports/shards.json, written by the encode_shards stage."""
from __future__ import annotations

from dataclasses import dataclass


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
