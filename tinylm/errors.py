"""What every stage script shares: user-fixable errors become one clear line and exit code 2."""
from __future__ import annotations

import sys
from typing import Callable


class PipelineError(Exception):
    """An error the user can fix; the message names the file or param at fault and the fix."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError prints `error: ...` instead of a traceback."""
    try:
        main()
    except PipelineError as exc:
        # One write of the whole line: torchrun's processes run unbuffered on one stderr pipe, where print()'s
        # two writes (the text, then its newline) interleave into "error: Xerror: X" (atomic below PIPE_BUF).
        sys.stderr.flush()
        sys.stderr.write(f"error: {exc}\n")
        sys.stderr.flush()
        sys.exit(2)
