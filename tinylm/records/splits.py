"""One record per split of the corpus: the shape download's and clean's records share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Splits(Generic[T]):
    """One T per split of the corpus."""

    train: T
    val: T
