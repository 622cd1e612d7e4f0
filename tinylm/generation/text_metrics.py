"""Diversity and repetition of generated text, on words (so they compare across tokenizers).

distinct-n (Li et al. 2016) is the share of a text's n-grams that are unique in it; repetition
rate is the share of its 4-grams that repeat an earlier one (rep-4 in Welleck et al. 2019), i.e.
1 - distinct-4. Both are counted per text and pooled over texts (sum of unique over sum of all),
so a strategy that writes one text per prompt (greedy, beam) compares fairly with one that writes
five: pooling n-grams across texts instead would reward the larger corpus.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

# Words and single punctuation marks: "said, " gives ["said", ","], so a repeated comma-phrase counts.
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return WORD_PATTERN.findall(text)


def ngram_counts(units: Sequence[str], n: int) -> tuple[int, int]:
    """(unique n-grams, all n-grams) of one text."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return len(set(grams)), len(grams)


def _pooled_counts(texts: Iterable[str], n: int) -> tuple[int, int]:
    unique = total = 0
    for text in texts:
        text_unique, text_total = ngram_counts(words(text), n)
        unique += text_unique
        total += text_total
    return unique, total


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams per text, summed, over all n-grams; 0 when no text has n words."""
    unique, total = _pooled_counts(texts, n)
    return unique / total if total else 0.0


def repetition_rate(texts: Iterable[str], n: int = 4) -> float:
    """Share of n-grams that repeat an n-gram seen earlier in the same text; 0 when none exist."""
    unique, total = _pooled_counts(texts, n)
    return (total - unique) / total if total else 0.0
