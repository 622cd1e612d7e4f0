"""reports/clean.json, written by the clean stage."""
from __future__ import annotations

from dataclasses import dataclass

from tinylm.records.splits import Splits


@dataclass(frozen=True)
class CleanSplit:
    stories_in: int
    stories_out: int
    mojibake_repaired: int
    dropped: dict[str, int]  # every reason of tinylm.corpus.clean.DROP_REASONS -> stories dropped for it


# reports/clean.json: what the clean stage kept, repaired and dropped, per split.
CleanReport = Splits[CleanSplit]
