"""Story file formats: the official `<|endoftext|>` text, blank-line separated text, and JSONL.

- `.jsonl` (or `.json`): one JSON object per line with a string "text" field (what download writes);
- `.txt` in the official format: each story followed by a line `<|endoftext|>` (what clean writes);
- `.txt` whose stories and paragraphs are both separated by blank lines (the V1 files as found in
  the wild): a paragraph matching `data.story_start_regex` opens a new story.

Readers stream (memory bounded by one story) and fail with the file and the fix on bad input.
"""
from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tinylm.errors import PipelineError
from tinylm.files import atomic_open

EOT_LINE = "<|endoftext|>"


def _check_utf8(path: Path) -> None:
    """Raise a clear error at the first invalid UTF-8 byte (decoding errors must not lose text)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise PipelineError(
                    f"{path}: not valid UTF-8 at byte {offset + exc.start}. Fix: re-encode the file as"
                    " UTF-8 (e.g. iconv -f cp1252 -t utf-8)."
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise PipelineError(f"{path}: ends in the middle of a UTF-8 character; the file is truncated") from None


def _has_eot_lines(path: Path) -> bool:
    """True at the first `<|endoftext|>` line (early in the official format), False at the end."""
    with open(path, encoding="utf-8") as f:
        return any(line.strip() == EOT_LINE for line in f)


def iter_eot_stories(path: Path) -> Iterator[str]:
    """Stories separated by `<|endoftext|>` lines (the official plain-text format)."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:  # universal newlines: CRLF becomes \n
        for line in f:
            if line.strip() == EOT_LINE:
                yield "".join(lines).removesuffix("\n")  # that newline belongs to the separator
                lines = []
            else:
                lines.append(line)
    if "".join(lines).strip():
        yield "".join(lines)


def write_eot_stories(path: Path, stories: Iterable[str]) -> int:
    """Write stories in the official format (each followed by a `<|endoftext|>` line), atomically."""
    count = 0
    with atomic_open(path) as f:
        for story in stories:
            f.write(f"{story}\n{EOT_LINE}\n")
            count += 1
    return count


def iter_blankline_stories(path: Path, story_start: re.Pattern[str]) -> Iterator[str]:
    """Blank-line separated paragraphs; a paragraph matching `story_start` opens a new story."""
    paragraphs: list[str] = []
    current: list[str] = []

    def flush_paragraph() -> Iterator[str]:
        paragraph = "".join(current).strip("\n")
        current.clear()
        if not paragraph.strip():
            return
        if story_start.match(paragraph.lstrip()) and paragraphs:
            yield "\n\n".join(paragraphs)
            paragraphs.clear()
        paragraphs.append(paragraph)

    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                current.append(line)
            else:
                yield from flush_paragraph()
    yield from flush_paragraph()
    if paragraphs:
        yield "\n\n".join(paragraphs)


def iter_jsonl_stories(path: Path, progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """The "text" of each line; `progress`, if given, is told the bytes read so far every 1,000 lines."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if progress is not None and number % 1000 == 0:
                progress(f.buffer.tell())
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise PipelineError(f'{path}:{number}: each line must be an object with a string "text" field')
            yield record["text"]
        if progress is not None:
            progress(f.buffer.tell())


def iter_file_stories(path: Path, story_start: re.Pattern[str]) -> Iterator[str]:
    _check_utf8(path)
    if path.suffix in (".jsonl", ".json"):
        return iter_jsonl_stories(path)
    if _has_eot_lines(path):
        return iter_eot_stories(path)
    return iter_blankline_stories(path, story_start)


def read_raw_split(path: Path, progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """Stories of a `data/raw/{split}.jsonl` file written by `download` (`progress` as above)."""
    if not path.is_file():
        raise PipelineError(f"{path}: missing. Fix: run `dvc repro download` first.")
    return iter_jsonl_stories(path, progress)
