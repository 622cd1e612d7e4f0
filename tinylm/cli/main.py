"""The `tinylm` console command: use the trained model (generate, score, tokenize, serve) and compare runs.

A story should start printing about as soon as torch is imported, so this module imports only
argparse, and builds the arguments of the command being run alone, importing its module then:
`tinylm tokenize` never imports torch, and dvc is imported only for --rev and compare. Every error
a user can fix is one line on stderr naming the fix, with exit code 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn, Sequence

COMMANDS = {
    "generate": ("tinylm.cli.generate", "write stories from a prompt, printed as they are decoded"),
    "score": ("tinylm.cli.score", "the model's loss, perplexity and bits per byte on a text"),
    "tokenize": ("tinylm.cli.tokens", "the tokens (ids and pieces) a text becomes"),
    "serve": ("tinylm.cli.serve", "an OpenAI-compatible HTTP API and a playground page for the model"),
    "compare": ("tinylm.cli.compare", "runs grouped by config: mean ± sd, CIs and verdicts against a baseline"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like the command's other errors (argparse would print the whole usage first).
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(command: str | None) -> Parser:
    """The parser, with the arguments of `command` only (the others are listed, not built)."""
    from importlib.metadata import version

    parser = Parser(prog="tinylm", description="Use the model trained by this repository's DVC pipeline.",
                    epilog="`tinylm COMMAND --help` lists each command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('tinylm')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name, (module_name, summary) in COMMANDS.items():
        command_parser = commands.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    from tinylm.errors import PipelineError

    try:
        return args.run(args)
    except PipelineError as exc:
        print(f"tinylm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`tinylm generate ... | head -3`): stop quietly. stdout is pointed at /dev/null so
        # that the interpreter's final flush does not fail on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
