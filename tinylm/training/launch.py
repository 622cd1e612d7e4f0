"""pretrain's launch: `python -m tinylm.training.launch --nnodes N --nproc_per_node M --rdzv_backend B
--rdzv_endpoint HOST:PORT [-m] SCRIPT [ARG ...]`, torchrun's options as dvc.yaml passes them.

One process in all (N x M == 1, the default): SCRIPT replaces this process (exec), so it runs
exactly as `python [-m] SCRIPT` does, writing the same bytes, and a failure's one-line error
(tinylm.errors.run_stage) is the last thing it prints. Under torchrun, that line was followed by
torchrun's 30-line ChildFailedError traceback, and the line a user had to read was buried.

Several processes: torch.distributed.run, in this process, with the same options. Everything the
processes write to stderr is copied through as it comes, and their `error: ...` lines are kept;
when a process fails, torchrun's summary of the failure is printed without its traceback, then
each kept error line once, so the last lines say what went wrong. The exit code is the failed
process's.

Not a dependency of the pretrain stage in dvc.yaml: like torchrun, it decides how the script
starts, not a byte the script writes (and the script itself checks that the launch matches the
params: tinylm.training.runtime.check_launch).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from typing import Iterator, NoReturn, Sequence

ERROR_PREFIX = b"error: "  # how run_stage starts the line of a PipelineError
READER_GRACE_S = 10.0  # for the last bytes from the processes' stderr, once torchrun has returned


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tinylm.training.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nnodes", type=int, required=True, help="machines taking part (train.nnodes)")
    parser.add_argument("--nproc_per_node", type=int, required=True,
                        help="processes on each machine (train.nproc_per_node)")
    parser.add_argument("--rdzv_backend", required=True, help="torchrun's rendezvous backend")
    parser.add_argument("--rdzv_endpoint", required=True, help="HOST:PORT where the nodes meet (train.rdzv_endpoint)")
    parser.add_argument("-m", "--module", action="store_true",
                        help="SCRIPT is a module (`python -m SCRIPT`, as torchrun's -m): dvc.yaml runs stages.pretrain "
                             "so the run imports the tinylm of its own checkout")
    parser.add_argument("script", help="the stage script, or its module with -m")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return parser.parse_args(argv)


def torchrun_args(args: argparse.Namespace) -> list[str]:
    return ["--nnodes", str(args.nnodes), "--nproc_per_node", str(args.nproc_per_node), "--rdzv_backend",
            args.rdzv_backend, "--rdzv_endpoint", args.rdzv_endpoint, *_program(args)]


def _program(args: argparse.Namespace) -> list[str]:
    return [*(["-m"] if args.module else []), args.script, *args.script_args]


@contextlib.contextmanager
def error_lines_kept() -> Iterator[list[str]]:
    """Route fd 2, this process's and every child's it starts, through a pipe whose bytes are copied to
    the real stderr as they arrive; yield the list of `error: ...` lines seen, filled as they come."""
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    real_stderr = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    kept: list[str] = []

    def copy() -> None:
        pending = b""
        with open(real_stderr, "wb", buffering=0, closefd=False) as out:
            while chunk := os.read(read_end, 1 << 16):
                out.write(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                kept.extend(line.decode("utf-8", "replace") for line in lines if line.startswith(ERROR_PREFIX))

    reader = threading.Thread(target=copy, name="stderr-copy", daemon=True)
    reader.start()
    try:
        yield kept
    finally:
        sys.stderr.flush()
        os.dup2(real_stderr, 2)  # closes the pipe's last write end here; the finished processes held the others
        reader.join(READER_GRACE_S)
        os.close(read_end)
        os.close(real_stderr)


def run_processes(args: argparse.Namespace) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with error_lines_kept() as errors:
        try:
            torchrun.run(torchrun.parse_args(torchrun_args(args)))
            return 0
        except ChildFailedError as failed:
            summary, (_, first) = failed.format_msg(), failed.get_first_failure()
    print(summary, file=sys.stderr)
    for line in dict.fromkeys(errors):  # every rank may fail on the same input: each line once, in order
        print(line, file=sys.stderr)
    return first.exitcode if first.exitcode > 0 else 1


def exec_script(args: argparse.Namespace) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *_program(args)])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.nnodes * args.nproc_per_node == 1:
        exec_script(args)
    return run_processes(args)


if __name__ == "__main__":
    sys.exit(main())
