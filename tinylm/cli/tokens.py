"""`tinylm tokenize`: the tokens a text becomes, as the model sees it: their ids and the bytes they stand for.

Like the report's table of how words reach the model (the `strawberry` example): with no text on a
terminal it shows the report's own example words (`tinylm.tokenizer.compare.EXAMPLE_WORDS`). It
needs the tokenizer only, so it never imports torch.
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from tinylm.cli.inputs import argument_text, stdin_text
from tinylm.cli.models import add_source_arguments, load, print_heading, sources
from tinylm.errors import PipelineError
from tinylm.tokenizer.bpe import Tokenizer

DESCRIPTION = """\
Print the tokens each TEXT becomes: one row per token, its id and the bytes it stands for.
A space is shown as ␣ (BPE tokens carry the space before a word), a token that holds only part of
a multi-byte character shows its bytes as \\xNN."""

EPILOG = """\
examples:
  tinylm tokenize "strawberry" " strawberry"
  echo "Once upon a time" | tinylm tokenize
  tinylm tokenize --rev main "Once upon a time\""""


def shown(token: bytes) -> str:
    """A token on one line: spaces as ␣, control characters escaped (\\n), and bytes that do not
    make a whole UTF-8 character (a token may hold part of one) as \\xNN."""
    return printable(token.decode("utf-8", errors="backslashreplace")).replace(" ", "␣")


def printable(text: str) -> str:
    """`text` on one line: control characters (newlines, tabs) escaped."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument("texts", metavar="TEXT", nargs="*",
                        help="texts to tokenize (default: stdin when it is piped, else the report's example words)")
    add_source_arguments(parser, with_model=False)


def texts_of(args: argparse.Namespace) -> list[str]:
    if args.texts:
        return [argument_text(text, f"TEXT argument {number}") for number, text in enumerate(args.texts, start=1)]
    if not sys.stdin.isatty():
        text = stdin_text().rstrip("\r\n")  # the newline that ends a piped line is not part of the text
        if not text:
            raise PipelineError('stdin is empty: give the text to tokenize, e.g. tinylm tokenize "strawberry"')
        return [text]
    from tinylm.tokenizer.compare import EXAMPLE_WORDS

    return list(EXAMPLE_WORDS)


def print_tokens(tokenizer: Tokenizer, text: str, out: TextIO) -> None:
    ids = tokenizer.encode(text)
    size = len(text.encode("utf-8"))
    out.write(f"{text!r}: {len(ids)} token{'s' * (len(ids) != 1)}, {size} bytes\n")
    width = max(len("id"), *(len(str(i)) for i in ids)) if ids else len("id")
    out.write(f"  {'id':>{width}}  token\n")
    for token in ids:
        out.write(f"  {token:>{width}}  {shown(tokenizer.decode_bytes([token]))}\n")


def run(args: argparse.Namespace) -> int:
    texts = texts_of(args)
    chosen = sources(args, with_model=False)
    for number, source in enumerate(chosen):
        tokenizer = load(source, device=None).tokenizer
        if len(chosen) > 1:
            print_heading(source.label, number, sys.stdout)
        for index, text in enumerate(texts):
            if index:
                sys.stdout.write("\n")
            print_tokens(tokenizer, text, sys.stdout)
    return 0
