"""Pre-tokenization shared by BPE training and encoding: special tokens first, then GPT-2's regex.

Text is cut on the declared special tokens (longest first, so `<|endoftext|><|endoftext|>` beats
`<|endoftext|>` at the same position); each piece between them is split by GPT-2's pattern into
pre-tokens, and BPE merges never cross a pre-token. So no merge crosses a document boundary.

Streaming (training on a big file) cuts the text into blocks at
points where the result cannot depend on what follows, so that processing the blocks one at a
time gives exactly the pre-tokens of the whole text, in memory bounded by the block size.
"""
from __future__ import annotations

import codecs
import os
from typing import Iterable, Iterator, Sequence

import regex

from tinylm.errors import PipelineError

# GPT-2's pre-tokenizer (also tiktoken's `gpt2` and HF's ByteLevel): contractions, letter runs,
# number runs and punctuation runs each with an optional leading space, then whitespace runs.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PATTERN)

# No pre-token contains a non-space followed by a space, so the point between them is always a
# pre-token boundary. `(?r)` searches backwards, to find the last such point cheaply.
_LAST_WORD_END_RE = regex.compile(r"(?r)\S(?=\s)")


class TokenizerError(PipelineError, ValueError):
    """Bad tokenizer input: a vocab size, a special token, a corpus or a tokenizer file."""


def check_special_tokens(special_tokens: Sequence[str]) -> list[str]:
    tokens = list(special_tokens)
    for token in tokens:
        if not isinstance(token, str):
            raise TokenizerError(f"special token {token!r} must be a string")
        if token == "":
            raise TokenizerError("a special token cannot be an empty string")
    duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
    if duplicates:
        raise TokenizerError(f"special tokens listed twice: {duplicates}")
    return tokens


class PreTokenizer:
    """Splits text on special tokens, then into GPT-2 pre-tokens."""

    def __init__(self, special_tokens: Sequence[str] = ()) -> None:
        self.special_tokens = check_special_tokens(special_tokens)
        by_length = sorted(self.special_tokens, key=len, reverse=True)
        alternatives = "|".join(regex.escape(token) for token in by_length)
        # One capturing group: `split` keeps the specials at the odd indices.
        self.special_re = regex.compile(f"({alternatives})") if by_length else None
        self._proper_prefixes = {t[:k] for t in self.special_tokens for k in range(1, len(t))}
        self._longest_prefix = max((len(t) - 1 for t in self.special_tokens), default=0)

    def split_specials(self, text: str) -> list[str]:
        """[text, special, text, special, ..., text]: specials at odd indices, texts may be empty."""
        if self.special_re is None:
            return [text]
        return self.special_re.split(text)

    def ordinary_pieces(self, text: str) -> list[str]:
        """The texts between special tokens (what training counts pre-tokens in)."""
        return self.split_specials(text)[::2]

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that more text could turn into a special token."""
        for k in range(min(self._longest_prefix, len(text)), 0, -1):
            if text[-k:] in self._proper_prefixes:
                return k
        return 0

    def safe_cut(self, text: str) -> int:
        """The largest position found where `text` can be cut, whatever text follows it.

        Pre-tokenizing text[:cut] and then text[cut:] + more gives the pre-tokens of the whole.
        Returns 0 when no such point is known (the caller reads more text).
        """
        limit = len(text) - self._held_suffix(text)
        cut = 0
        if self.special_re is not None:
            # A special starting before `limit` is complete: a longer one would run past the end,
            # and then its start would lie in the held suffix.
            for match in self.special_re.finditer(text):
                if match.start() >= limit:
                    break
                cut = match.end()
        word_end = _LAST_WORD_END_RE.search(text, cut, max(cut, limit))
        if word_end is not None:
            cut = word_end.end()
        return cut

    def blocks(self, chunks: Iterable[str], block_chars: int = 1 << 20) -> Iterator[str]:
        """Regroup a stream of strings into blocks of about `block_chars` cut at safe points."""
        pending: list[str] = []
        size = 0
        threshold = block_chars
        for chunk in chunks:
            pending.append(chunk)
            size += len(chunk)
            if size < threshold:
                continue
            buffer = "".join(pending)
            cut = self.safe_cut(buffer)
            if cut:
                yield buffer[:cut]
                buffer = buffer[cut:]
            # With no safe point yet (one enormous word), wait for twice as much text rather
            # than rescanning the same buffer for every new chunk.
            threshold = block_chars if cut else 2 * len(buffer)
            pending = [buffer]
            size = len(buffer)
        tail = "".join(pending)
        if tail:
            yield tail


def read_utf8(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> Iterator[str]:
    """Stream a UTF-8 file as strings; invalid UTF-8 is an error naming the file and byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: not found") from None
    with f:
        while True:
            data = f.read(chunk_bytes)
            final = not data
            pending = len(decoder.getstate()[0])  # bytes of a character split by the last read
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                raise TokenizerError(
                    f"{path}: not valid UTF-8 at byte offset {at} ({exc.reason}); "
                    "re-encode the file as UTF-8 (the clean stage writes UTF-8)") from None
            offset += len(data)
            if text:
                yield text
            if final:
                return
