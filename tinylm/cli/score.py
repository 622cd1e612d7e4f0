"""`tinylm score`: how well the model predicts a text: its loss per token, perplexity, bits per byte,
and the tokens that surprised it most.

The text is scored as a story: after <|endoftext|>, each token given the ones before it. A text
longer than the model's block_size is scored in sliding windows by `tinylm.evaluate.token_nll`, the
evaluate_ppl stage's scorer (each token once, with at least block_size - stride tokens of context
after the first window), and summarised by its `summarize`: the numbers reports/eval.json gives
for the validation set, here for your text.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from tinylm.cli.inputs import argument_text, file_text, names_a_path, stdin_text
from tinylm.cli.models import Loaded, add_source_arguments, load, print_heading, resolve_device, sources
from tinylm.cli.tokens import printable, shown
from tinylm.errors import PipelineError
from tinylm.records.evaluation import Score

BATCH_SIZE = 8  # windows per forward: a long file takes a few batched forwards, a short text one
CONTEXT_CHARS = 30  # of text shown before each surprising token

DESCRIPTION = """\
Score a text with the trained model: the loss (nats per token), perplexity and bits per byte of its
tokens, each predicted from the ones before it (the first from the <|endoftext|> that starts a
story), and the tokens it found most surprising."""

EPILOG = """\
examples:
  tinylm score "Once upon a time, there was a little girl named Lily."
  tinylm score story.txt --per-token
  tinylm score --rev main --rev exp-lr6e-4 story.txt"""


@dataclass(frozen=True)
class Scored:
    tokens: list[int]  # <|endoftext|>, then the text's tokens: the targets are tokens[1:]
    nll: np.ndarray  # nats, one per target
    score: Score


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument("text", metavar="TEXT|FILE", nargs="?",
                        help="the text, or a file holding it (default, or -: stdin)")
    parser.add_argument("--stride", type=int, metavar="N",
                        help="past block_size, score N new tokens per window, so each has at least block_size - N "
                             "tokens of context (default: block_size / 2)")
    parser.add_argument("--top", type=int, default=10, metavar="N",
                        help="how many of the most surprising tokens to list (default: %(default)s)")
    parser.add_argument("--per-token", action="store_true", help="list every token with its probability and loss")
    add_source_arguments(parser, with_model=True)


def read_text(argument: str | None) -> str:
    """The text to score: stdin (no argument, or -), the file the argument names, else the argument itself."""
    if argument is None or argument == "-":
        if sys.stdin.isatty():
            raise PipelineError('give the text to score: tinylm score "Once upon a time", or a file, or pipe it in')
        source, text = "stdin", stdin_text()
    elif names_a_path(argument):
        source, text = argument, file_text(Path(argument))
    else:
        source, text = "", argument_text(argument, "the TEXT argument")
    if not text.strip():
        raise PipelineError(f"the text{' in ' + source if source else ''} is empty: there is nothing to score")
    return text


def score(loaded: Loaded, text: str, stride: int | None) -> Scored:
    from tinylm.evaluate import plan_windows, summarize, token_byte_lengths, token_nll

    tokenizer, block_size = loaded.tokenizer, loaded.model.config.block_size
    tokens = [tokenizer.eot_id, *tokenizer.encode(text)]
    stride = stride or max(1, block_size // 2)
    try:
        plan_windows(len(tokens), block_size, stride)
    except ValueError as exc:
        raise PipelineError(f"--stride: {exc}") from None
    nll = token_nll(loaded.model, np.array(tokens), stride, BATCH_SIZE, desc="score")
    num_bytes = int(token_byte_lengths(tokenizer)[tokens[1:]].sum())
    return Scored(tokens, nll, summarize(nll, num_bytes))


def print_score(loaded: Loaded, scored: Scored, top: int, per_token: bool, out: TextIO) -> None:
    tokenizer = loaded.tokenizer
    targets, summary = scored.tokens[1:], scored.score
    out.write(f"{len(targets)} tokens: loss {summary.loss:.4f} nats/token, perplexity {summary.ppl:.3f}, "
              f"{summary.bpb:.4f} bits/byte\n")

    def row(index: int, context: bool) -> str:
        piece = shown(tokenizer.decode_bytes([targets[index]]))
        line = f"  {index + 1:>5}  {math.exp(-scored.nll[index]):6.4f}  {scored.nll[index]:6.3f}  {piece:<14}"
        if context:
            before = tokenizer.decode(scored.tokens[1:index + 1])
            cut = "…" if len(before) > CONTEXT_CHARS else ""
            line += f"  {cut}{printable(before[-CONTEXT_CHARS:])}[{piece}]"
        return line.rstrip() + "\n"

    if top > 0:
        worst = sorted(range(len(targets)), key=lambda i: -scored.nll[i])[:top]
        out.write("\nmost surprising tokens:\n      #       p    loss  token           in context\n")
        out.writelines(row(i, context=True) for i in worst)
    if per_token:
        out.write("\nevery token:\n      #       p    loss  token\n")
        out.writelines(row(i, context=False) for i in range(len(targets)))


def run(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise PipelineError(f"--top must be >= 0, got {args.top}")
    text = read_text(args.text)
    if not sys.stderr.isatty():
        # token_nll reports progress with tqdm, which reads its defaults from the environment when first
        # imported (here, or by dvc for --rev): a progress bar is for a person watching, not for a log or a pipe.
        os.environ.setdefault("TQDM_DISABLE", "1")
    device = resolve_device(args.device)
    models = [load(source, device) for source in sources(args, with_model=True)]
    for index, loaded in enumerate(models):
        if len(models) > 1:
            print_heading(loaded.label, index, sys.stdout)
        print_score(loaded, score(loaded, text, args.stride), args.top, args.per_token, sys.stdout)
    return 0
