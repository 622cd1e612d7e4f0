"""The clean stage's logic: repair, normalise, then drop stories for counted reasons.

Per story, in order:
1. repair mojibake with ftfy (`â€™` -> `’`). cp1252 has no character for byte 0x9D, so the
   closing quote `”` (E2 80 9D) often reaches us as a bare `â€`; we restore that byte first so
   ftfy can decode the sequence instead of leaving it;
2. Unicode NFC, line ends to `\n`, runs of spaces/tabs to one space, no trailing spaces, at
   most one blank line between paragraphs; optionally curly quotes and dashes to ASCII;
3. drop, with the first reason that applies: `empty`, `special_token` (the story contains a
   declared special token such as `<|endoftext|>`: we drop rather than escape it, so that the
   tokenizer never sees one inside a story and document boundaries stay unambiguous),
   `nontext` (too many characters that are neither letters, digits, whitespace nor common
   punctuation), `too_short`, `too_long`, `truncated` (does not end like a sentence: the cut-off
   last story of a file);
4. per split, drop exact `duplicate`s; then drop train stories that also appear in validation
   (`val_overlap`), so that validation measures generalisation, not memorisation.

Deterministic: the output depends only on the input and the params (first occurrence wins).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import ftfy

from tinylm.config import CleanParams
from tinylm.records.clean import CleanSplit

DROP_REASONS = ("empty", "special_token", "nontext", "too_short", "too_long", "truncated",
                "duplicate", "val_overlap")

_FTFY = ftfy.TextFixerConfig(uncurl_quotes=False, normalization="NFC", explain=True)
# Characters cp1252 (as ftfy's sloppy codec reads it) makes of the UTF-8 continuation bytes.
_CONTINUATIONS = bytes(range(0x80, 0xC0)).decode("sloppy-windows-1252")
_LOST_9D = re.compile("â€(?![" + re.escape(_CONTINUATIONS) + "])")
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_ASCII_PUNCTUATION = str.maketrans({"‘": "'", "’": "'", "‚": "'", "“": '"', "”": '"', "„": '"',
                                    "–": "-", "—": "-", "−": "-", "…": "..."})
# A story ends like a sentence (terminal punctuation, optionally closing quotes) or with "The End".
_SENTENCE_END = re.compile(r"""(?:[.!?…]["'”’»)\]]*|\bthe end)$""", re.IGNORECASE)
_COMMON_PUNCTUATION = set(""".,;:!?'"()[]-–—…‘’“”*&%$#@/\\+=_~`^<>|{}""")


@dataclass
class SplitReport:
    """The counts of one split, updated story by story by `clean_split`; `record()` freezes them."""

    stories_in: int = 0
    stories_out: int = 0
    mojibake_repaired: int = 0
    dropped: Counter = field(default_factory=Counter)

    def record(self) -> CleanSplit:
        """The split's part of reports/clean.json; every reason is listed, a zero included."""
        return CleanSplit(stories_in=self.stories_in, stories_out=self.stories_out,
                          mojibake_repaired=self.mojibake_repaired,
                          dropped={reason: self.dropped[reason] for reason in DROP_REASONS})


def repair_mojibake(text: str) -> tuple[str, bool]:
    """ftfy's repair (and NFC); the flag says whether an encoding error was actually undone."""
    result = ftfy.fix_and_explain(_LOST_9D.sub("â€\x9d", text), _FTFY)
    repaired = any(step in ("encode", "decode", "transcode") or name == "decode_inconsistent_utf8"
                   for step, name in (result.explanation or []))
    return result.text, repaired


def normalise_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_story(text: str, params: CleanParams) -> tuple[str, bool]:
    """The repaired and normalised story, and whether mojibake was repaired."""
    text, repaired = repair_mojibake(text)
    text = unicodedata.normalize("NFC", normalise_whitespace(text))
    if params.ascii_punctuation:
        text = text.translate(_ASCII_PUNCTUATION)
    return text, repaired


def nontext_fraction(text: str) -> float:
    odd = sum(1 for c in text if not (c.isalnum() or c.isspace() or c in _COMMON_PUNCTUATION))
    return odd / max(len(text), 1)


def drop_reason(text: str, params: CleanParams, special_tokens: list[str]) -> str | None:
    if not text:
        return "empty"
    if any(token in text for token in special_tokens):
        return "special_token"
    if nontext_fraction(text) > params.max_nontext_fraction:
        return "nontext"
    if len(text) < params.min_chars:
        return "too_short"
    if len(text) > params.max_chars:
        return "too_long"
    if not _SENTENCE_END.search(text):
        return "truncated"
    return None


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def clean_split(stories: Iterable[str], params: CleanParams, special_tokens: list[str],
                report: SplitReport, exclude: set[bytes] | None = None) -> Iterator[str]:
    """Clean stories one by one, skipping (and counting) dropped ones; `exclude` holds digests
    of stories that belong to another split (validation, when cleaning train)."""
    seen: set[bytes] = set()
    for raw in stories:
        report.stories_in += 1
        if len(raw) > 4 * params.max_chars:  # no cleaning can bring it in range: skip ftfy's cost
            report.dropped["too_long"] += 1
            continue
        text, repaired = clean_story(raw, params)
        report.mojibake_repaired += repaired
        reason = drop_reason(text, params, special_tokens)
        if reason is None:
            key = digest(text)
            if key in seen:
                reason = "duplicate"
            elif exclude is not None and key in exclude:
                reason = "val_overlap"
            seen.add(key)
        if reason is not None:
            report.dropped[reason] += 1
            continue
        report.stories_out += 1
        yield text
