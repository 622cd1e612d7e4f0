"""The text a user hands `tinylm`: an argument, a file or stdin, accepted only as UTF-8 text.

Python hands over argv (and, under a C locale, stdin) with every byte that is not UTF-8 smuggled in
as a lone surrogate, which fails much later, inside the tokenizer or at print, with a traceback.
Here the bytes are decoded strictly where they come in, so a Latin-1 file, a binary file (a NUL
byte) or a directory named as a file is one line naming the input, the byte and the fix.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tinylm.errors import PipelineError

FIX = "Fix: give UTF-8 text (`iconv -f ENCODING -t UTF-8 FILE` converts a file from its encoding)"


def decoded(data: bytes, where: str) -> str:
    """`data` as text, strict UTF-8 with no NUL byte; `where` names the input in the error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}: "
                            f"{exc.reason}). {FIX}") from None
    if "\0" in text:
        raise PipelineError(f"{where} holds a NUL byte (at offset {data.index(0)}): that is binary data, not "
                            f"text. {FIX}")
    return text


def argument_text(argument: str, where: str) -> str:
    """A command-line argument (or a typed line) as the bytes the user gave, checked as `decoded` checks."""
    return decoded(argument.encode("utf-8", "surrogateescape"), where)


def stdin_text() -> str:
    """All of stdin, read as bytes (its text layer would decode with the locale's error handler)."""
    return decoded(sys.stdin.buffer.read(), "stdin")


def names_a_path(argument: str) -> bool:
    """Whether the argument names something on disk; a text too long for a file name is none (the OS
    refuses to look it up, ENAMETOOLONG, where a text pasted as the argument would otherwise crash)."""
    try:
        return Path(argument).exists()
    except OSError:
        return False


def file_text(path: Path) -> str:
    if path.is_dir():
        raise PipelineError(f"{path} is a directory, not a text file: name a file in it, or give the text itself")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PipelineError(f"{path}: cannot be read ({exc.strerror})") from None
    return decoded(data, str(path))
