"""`tinylm generate`: stories from a prompt, printed as they are decoded.

Every strategy runs through `tinylm.generation.sampling.decode`, whose `on_step` hands over each new
token. `Stream` turns tokens into text through an incremental UTF-8 decoder, so a character whose
bytes span tokens is printed once its last byte has come, never as a broken half, and what it
prints equals `tokenizer.decode` of the tokens. Beam search is the exception: its best hypothesis
is known only when the search ends, so it is printed then.

The prompt follows <|endoftext|>, as every story does in training (and as the sample sweep's
prompts do). Sample i of --num-samples is drawn with seed --seed + i, alone in its batch (a sample
depends on its seed only), so each prints as it is decoded and any one can be redrawn by its seed.

With neither --strategy nor a strategy knob, stories are sampled with min-p 0.05
(DEFAULT_STRATEGY), which reads better than the model's raw distribution; otherwise exactly the
flags given count (`--strategy sample`, with or without `--temperature 1`, is the raw
distribution). On a terminal, control characters in a story are printed escaped (\\x1b), since
an escape sequence a model emits would drive the terminal; `--raw`, or a pipe, gets the text as it is.
"""
from __future__ import annotations

import argparse
import codecs
import dataclasses
import math
import sys
import time
import unicodedata
from dataclasses import dataclass
from typing import TextIO

import torch

from tinylm.cli.inputs import FIX, argument_text, stdin_text
from tinylm.cli.models import Loaded, add_source_arguments, load, print_heading, resolve_device, sources
from tinylm.cli.tokens import shown
from tinylm.errors import PipelineError
from tinylm.generation.decoder import Generation, check_length
from tinylm.generation.sampling import Greedy, Sample, Strategy, decode
from tinylm.generation.search import Beam, Contrastive
from tinylm.tokenizer.bpe import Tokenizer

STRATEGIES: dict[str, type[Strategy]] = {"greedy": Greedy, "sample": Sample, "beam": Beam, "contrastive": Contrastive}
MAX_NEW_TOKENS = 200  # a TinyStories story is about 150-250 tokens
# With no decoding flag: min-p keeps the tokens at least 5% as likely as the best one, which cuts the
# long tail that sends plain sampling astray (the README's samples), yet keeps stories varied.
DEFAULT_STRATEGY = Sample(min_p=0.05)
KEPT_CONTROLS = "\n\t"  # the control characters a story is made of

DESCRIPTION = """\
Continue PROMPT with the trained model, printing the story as it is decoded, until the model ends
it (<|endoftext|>) or --max-new-tokens. The prompt comes from the argument, else from stdin when
it is piped; with neither, on a terminal, each line you type starts a story (Ctrl-C stops a
story, Ctrl-D quits). By default stories are sampled with min-p 0.05; --strategy sample alone
is the model's raw distribution. Beam search cannot stream (its hypotheses change until the
search ends): its story is printed when it is done. With several --rev, every revision tells its
stories with the same seeds, one revision after the other."""

EPILOG = """\
examples:
  tinylm generate "Once upon a time"
  tinylm generate --strategy greedy --max-new-tokens 50 "The dog"
  tinylm generate --top-p 0.9 --num-samples 3 --seed 1 "Lily found a box"
  tinylm generate --strategy beam --beam-width 8 "Tom was sad"
  tinylm generate --rev main --rev exp-lr6e-4 "Once upon a time"
  echo "Tom had a red ball" | tinylm generate --show-probs"""


@dataclass(frozen=True)
class Knob:
    """A strategy parameter as a flag: its default and its validation are the strategy dataclass's."""

    flag: str
    strategy: str  # the --strategy it belongs to
    field: str  # its field in that strategy's dataclass
    type: type
    metavar: str
    help: str

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def default(self) -> object:
        return next(f.default for f in dataclasses.fields(STRATEGIES[self.strategy]) if f.name == self.field)


KNOBS = (
    Knob("--temperature", "sample", "temperature", float, "T",
         "divide the logits by T: below 1 sharper, above 1 flatter"),
    Knob("--top-k", "sample", "top_k", int, "K", "sample among the K most likely tokens"),
    Knob("--top-p", "sample", "top_p", float, "P",
         "nucleus: sample among the most likely tokens that hold probability P"),
    Knob("--min-p", "sample", "min_p", float, "P", "keep the tokens at least P times as likely as the most likely one"),
    Knob("--beam-width", "beam", "width", int, "N", "hypotheses kept at each step"),
    Knob("--length-penalty", "beam", "length_penalty", float, "A",
         "rank hypotheses by sum log p / length^A (0: the raw sum, which favours short ones)"),
    Knob("--contrastive-k", "contrastive", "top_k", int, "K", "candidates weighed at each step"),
    Knob("--alpha", "contrastive", "alpha", float, "A", "weight of the penalty for repeating the context (0: greedy)"),
)
GROUPS = {"sample": "sampling (--strategy sample)", "beam": "beam search (--strategy beam)",
          "contrastive": "contrastive search (--strategy contrastive)"}


@dataclass(frozen=True)
class Settings:
    strategy: Strategy
    seeds: list[int]
    max_new_tokens: int
    use_cache: bool
    show_probs: bool
    low_prob: float
    stats: bool
    escape: bool  # control characters shown escaped (stdout is a terminal and no --raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument("prompt", metavar="PROMPT", nargs="?",
                        help="the start of the story (default: stdin when piped, else an interactive loop)")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--strategy", choices=STRATEGIES,
                          help="default: the strategy whose knobs are given (a knob not given is off); with "
                               "neither --strategy nor a knob, sample with --min-p 0.05; beam prints its story "
                               "when the search ends, it cannot stream")
    decoding.add_argument("--seed", type=int, default=0, help="seed of the first sample (default: %(default)s)")
    decoding.add_argument("--num-samples", type=int, default=1, metavar="N",
                          help="stories to sample, with seeds seed, seed + 1, ... (default: %(default)s)")
    decoding.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, metavar="N",
                          help="stop after N tokens if the model has not ended the story (default: %(default)s)")
    decoding.add_argument("--no-cache", action="store_true",
                          help="recompute the whole context at every step instead of using the KV cache (same "
                               "tokens, slower: the benchmark's baseline)")
    for strategy, title in GROUPS.items():
        group = parser.add_argument_group(title)
        for knob in (k for k in KNOBS if k.strategy == strategy):
            default = "off" if knob.default is None else knob.default
            if knob.strategy == "sample" and getattr(DEFAULT_STRATEGY, knob.field) != knob.default:
                default = f"{default}; {getattr(DEFAULT_STRATEGY, knob.field)} with neither --strategy nor a knob"
            group.add_argument(knob.flag, type=knob.type, metavar=knob.metavar,
                               help=f"{knob.help} (default: {default})")
    output = parser.add_argument_group("output")
    output.add_argument("--show-probs", action="store_true",
                        help="after each story, list its tokens with the model's probability of each (at temperature "
                             "1, before any filtering), marking the unlikely ones")
    output.add_argument("--low-prob", type=float, default=0.05, metavar="P",
                        help="--show-probs marks tokens of probability below P (default: %(default)s)")
    output.add_argument("--stats", action="store_true", help="print tokens and tokens/s of each story on stderr")
    output.add_argument("--raw", action="store_true",
                        help="print control characters of the story as they are, even on a terminal (where they "
                             "are shown escaped, as \\x1b, so that a story cannot drive the terminal); a pipe "
                             "always gets the raw text")
    add_source_arguments(parser, with_model=True)


def strategy_from(args: argparse.Namespace) -> Strategy:
    """The strategy the flags ask for, validated by its dataclass; a knob of another strategy is an error."""
    given = [knob for knob in KNOBS if getattr(args, knob.dest) is not None]
    implied = sorted({knob.strategy for knob in given})
    if args.strategy is None and len(implied) > 1:
        raise PipelineError(f"{' and '.join(k.flag for k in given)} belong to different strategies "
                            f"({', '.join(implied)}): pick one with --strategy")
    if args.strategy is None and not given:
        return DEFAULT_STRATEGY
    name = args.strategy or implied[0]
    for knob in given:
        if knob.strategy != name:
            raise PipelineError(f"{knob.flag} is a knob of --strategy {knob.strategy}, not {name}")
        try:
            STRATEGIES[name](**{knob.field: getattr(args, knob.dest)})
        except ValueError as exc:
            raise PipelineError(f"{knob.flag}: {exc}") from None
    return STRATEGIES[name](**{knob.field: getattr(args, knob.dest) for knob in given})


def settings_from(args: argparse.Namespace) -> Settings:
    strategy = strategy_from(args)
    try:
        check_length(args.max_new_tokens)
    except ValueError as exc:
        raise PipelineError(f"--max-new-tokens: {exc}") from None
    if args.num_samples < 1:
        raise PipelineError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_samples > 1 and strategy.deterministic:
        raise PipelineError(f"--strategy {type(strategy).__name__.lower()} is deterministic: --num-samples "
                            f"{args.num_samples} would print the same story {args.num_samples} times; sample with "
                            "--strategy sample")
    if not 0 <= args.low_prob <= 1:
        raise PipelineError(f"--low-prob must be in [0, 1], got {args.low_prob}")
    return Settings(strategy, [args.seed + i for i in range(args.num_samples)], args.max_new_tokens,
                    not args.no_cache, args.show_probs, args.low_prob, args.stats,
                    escape=not args.raw and sys.stdout.isatty())


def escape_controls(text: str) -> str:
    """`text` with its control characters but newline and tab escaped (\\x1b, \\r, \\x9b): printed as they
    are, an escape sequence would move the cursor, recolour or clear the terminal, or retitle its window."""
    return "".join(char if char in KEPT_CONTROLS or unicodedata.category(char) != "Cc"
                   else char.encode("unicode_escape").decode("ascii") for char in text)


class Stream:
    """Prints one story's tokens as they come; the bytes of an unfinished character wait for the rest."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO, escape: bool = False):
        self.tokenizer = tokenizer
        self.out = out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.shown = escape_controls if escape else str  # whole characters come out of the decoder: escape each
        self.ended = False

    def __call__(self, tokens: torch.Tensor) -> None:
        """decode's on_step: tokens [1], this step's token of the story's single row."""
        self.write([int(tokens[0])])

    def write(self, tokens: list[int]) -> None:
        for token in tokens:
            # A row that has ended keeps stepping with its batch; what follows <|endoftext|> is not its story.
            self.ended = self.ended or token == self.tokenizer.eot_id
            if self.ended:
                break
            self.out.write(self.shown(self.decoder.decode(self.tokenizer.decode_bytes([token]))))
        self.out.flush()

    def close(self) -> None:
        self.out.write(self.shown(self.decoder.decode(b"", final=True)) + "\n")
        self.out.flush()


def check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise PipelineError('the prompt is empty: give the first words of a story, e.g. tinylm generate "Once upon a '
                            'time"')


def prompt_ids(loaded: Loaded, prompt: str) -> list[int]:
    ids = [loaded.tokenizer.eot_id, *loaded.tokenizer.encode(prompt)]
    block_size = loaded.model.config.block_size
    if len(ids) > block_size:
        raise PipelineError(f"the prompt is {len(ids) - 1} tokens, but the model sees at most {block_size} (its "
                            f"block_size), one of them the <|endoftext|> that starts a story: shorten the prompt to "
                            f"{block_size - 1} tokens or fewer")
    return ids


def print_probs(generation: Generation, tokenizer: Tokenizer, low_prob: float, out: TextIO) -> None:
    produced = generation.tokens + ([tokenizer.eot_id] if generation.stopped_at_eot else [])
    out.write(f"\np: the model's probability of each token (temperature 1, before any filtering); "
              f"<- unlikely: p < {low_prob:g}\n     #       p  token\n")
    for number, (token, logprob) in enumerate(zip(produced, generation.logprobs), start=1):
        p = math.exp(logprob)
        piece = shown(tokenizer.decode_bytes([token]))
        line = f"  {number:>4}  {p:6.4f}  {piece:<14}{'  <- unlikely' * (p < low_prob)}"
        out.write(line.rstrip() + "\n")


def tell(models: list[Loaded], prompt: str, settings: Settings, out: TextIO) -> None:
    """Every model's stories for `prompt`, one after the other, with the same seeds."""
    streaming = not isinstance(settings.strategy, Beam)
    for index, loaded in enumerate(models):
        ids = prompt_ids(loaded, prompt)
        if len(models) > 1:
            print_heading(loaded.label, index, out)
        for number, seed in enumerate(settings.seeds, start=1):
            if len(settings.seeds) > 1:
                out.write(f"--- sample {number}/{len(settings.seeds)}, seed {seed} ---\n")
            out.write(escape_controls(prompt) if settings.escape else prompt)
            out.flush()
            stream = Stream(loaded.tokenizer, out, settings.escape)
            started = time.perf_counter()
            generation, = decode(loaded.model, ids, settings.strategy, settings.max_new_tokens, loaded.tokenizer.eot_id,
                                 [seed], settings.use_cache, on_step=stream if streaming else None)
            elapsed = time.perf_counter() - started
            if not streaming:
                stream.write(generation.tokens)
            stream.close()
            if settings.stats:
                produced = len(generation.logprobs)
                print(f"[{produced} tokens in {elapsed:.3f} s: {produced / elapsed:,.1f} tok/s, "
                      f"{'KV cache' if settings.use_cache else 'no cache'}]", file=sys.stderr, flush=True)
            if settings.show_probs:
                print_probs(generation, loaded.tokenizer, settings.low_prob, out)


def interactive(models: list[Loaded], settings: Settings) -> int:
    if sys.stdout.isatty():
        # Line editing and history for input(), which uses readline only when stdin and stdout are terminals
        # (imported otherwise, it may write terminal escapes into the piped stories).
        import readline  # noqa: F401

    print("Type the start of a story and press Enter. Ctrl-C stops a story; Ctrl-D, or Ctrl-C at the prompt, quits.",
          file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError as exc:  # the terminal's encoding is not UTF-8
            print(f"error: the line is not UTF-8 text ({exc.reason}). {FIX}", file=sys.stderr)
            continue
        if not prompt.strip():
            continue
        try:
            tell(models, argument_text(prompt, "the line"), settings, sys.stdout)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        except PipelineError as exc:  # a prompt too long for the context, or not text: say so, ask again
            print(f"error: {exc}", file=sys.stderr)


def read_prompt(args: argparse.Namespace) -> str | None:
    """The prompt argument, else piped stdin, else None (a terminal: the interactive loop)."""
    if args.prompt is not None:
        return argument_text(args.prompt, "the PROMPT argument")
    if sys.stdin.isatty():
        return None
    return stdin_text().rstrip("\r\n")  # the newline that ends a piped line is not part of the story


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    prompt = read_prompt(args)
    if prompt is not None:
        check_prompt(prompt)
    chosen = sources(args, with_model=True)
    device = resolve_device(args.device)
    models = [load(source, device) for source in chosen]
    if prompt is None:
        return interactive(models, settings)
    tell(models, prompt, settings, sys.stdout)
    return 0
