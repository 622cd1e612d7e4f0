"""The train_bpe stage's record, reports/tokenizer.json: our BPE beside other tokenizers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Compression:
    """A tokenizer on the validation text: more bytes per token means shorter sequences."""

    vocab_size: int
    val_tokens: int
    val_bytes_per_token: float


@dataclass(frozen=True)
class LearnedCompression(Compression):
    """A tokenizer trained on our stories, with the share of our multi-byte tokens it learned too."""

    vocab_overlap: float


@dataclass(frozen=True)
class ExampleTokens:
    ours: list[str]
    gpt2: list[str] | None  # None when GPT-2's files were not in TIKTOKEN_CACHE_DIR


@dataclass(frozen=True)
class TokenizerReport:
    """reports/tokenizer.json: our BPE's numbers, then the comparisons (see tinylm/tokenizer/compare.py)."""

    vocab_size: int
    num_merges: int
    train_seconds: float
    val_tokens: int
    val_bytes_per_token: float
    fingerprint: str
    compare_max_bytes: int  # tokenizer.compare_max_bytes: the most train text the comparisons below learn from
    compare_bytes: int  # the train text they learned from: all of it when it fits, else stories spread over it
    hf_bpe: LearnedCompression
    hf_unigram: LearnedCompression
    hf_unigram_metaspace: LearnedCompression
    gpt2: Compression | None  # None when GPT-2's files were not in TIKTOKEN_CACHE_DIR
    vocab_sizes: dict[str, Compression]  # our BPE retrained at each tokenizer.compare_vocab_sizes
    examples: dict[str, ExampleTokens]  # a few words -> their tokens, shown as text
