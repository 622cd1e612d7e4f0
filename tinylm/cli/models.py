"""Where `tinylm` finds a trained model and its tokenizer: local folders, or a git revision.

By default: data/model and data/tokenizer of the repository that holds the current directory (its
nearest folder with a .dvc/ or a dvc.yaml). `--model DIR` names another model folder, whose
tokenizer is the `tokenizer` folder beside it unless `--tokenizer DIR` says otherwise.

`--rev REV` reads data/model and data/tokenizer as they were at REV, a branch, tag, commit or DVC
experiment name: `dvc.api.DVCFileSystem` resolves revisions with `dvc.scm.resolve_rev`, which
falls back to experiment refs when git does not know the name. The files come from the DVC cache
or, when they are not there, from the remote configured at that revision, into a temporary
directory removed as soon as they are loaded: nothing is written to the repository. dvc is
imported for --rev only; it adds about a second to the start.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, TextIO

from tinylm.errors import PipelineError
from tinylm.tokenizer.bpe import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    import torch

    from tinylm.model import GPT

MODEL_DIR, TOKENIZER_DIR = "data/model", "data/tokenizer"
MODEL_FILES = ("model.pt", "model.json")  # what the pretrain stage writes


@dataclass(frozen=True)
class Source:
    """One model to load: local folders, or the repository's data/model and data/tokenizer at `rev`."""

    label: str  # how the output names it when there are several
    model_dir: Path | None = None
    tokenizer_dir: Path | None = None
    repo: Path | None = None
    rev: str | None = None


@dataclass(frozen=True)
class Loaded:
    label: str
    tokenizer: Tokenizer
    model: GPT | None  # None when only the tokenizer was asked for


def add_source_arguments(parser: argparse.ArgumentParser, with_model: bool) -> None:
    group = parser.add_argument_group("which model" if with_model else "which tokenizer")
    if with_model:
        group.add_argument("--model", metavar="DIR", type=Path,
                           help=f"folder holding {' and '.join(MODEL_FILES)} (default: {MODEL_DIR} of the repository "
                                "holding the current directory)")
    beside = "the `tokenizer` folder beside --model, else " if with_model else ""
    group.add_argument("--tokenizer", metavar="DIR", type=Path,
                       help=f"tokenizer folder (default: {beside}{TOKENIZER_DIR} of the repository)")
    folders = f"{MODEL_DIR} and {TOKENIZER_DIR} as they were" if with_model else f"{TOKENIZER_DIR} as it was"
    group.add_argument("--rev", metavar="REV", action="append", default=[],
                       help=f"use {folders} at this git revision or DVC experiment name, from the DVC "
                            "cache or remote; repeat it to compare revisions")
    if with_model:
        group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                           help="where the model runs; auto: cuda when available (default: %(default)s)")


def find_repo_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir() or (folder / "dvc.yaml").is_file():
            return folder
    return None


def _repo_root() -> Path:
    here = Path.cwd()
    root = find_repo_root(here)
    if root is None:
        raise PipelineError(f"no tinylm repository here: neither {here} nor a folder above it holds .dvc/ or dvc.yaml; "
                            "run inside the checkout, or name the folders with --model DIR (and --tokenizer DIR)")
    return root


def sources(args: argparse.Namespace, with_model: bool) -> list[Source]:
    """The models (with_model) or tokenizers the command line asks for, in its order."""
    model = args.model if with_model else None
    if args.rev:
        if model is not None or args.tokenizer is not None:
            raise PipelineError("--rev reads the repository's own folders as they were at that revision: drop "
                                "--model and --tokenizer")
        root = _repo_root()
        return [Source(label=f"rev {rev}", repo=root, rev=rev) for rev in args.rev]
    if args.tokenizer is not None:
        tokenizer = args.tokenizer
    elif model is not None:
        tokenizer = model.parent / "tokenizer"
    else:
        tokenizer = _repo_root() / TOKENIZER_DIR
    if with_model and model is None:
        model = _repo_root() / MODEL_DIR
    return [Source(label=str(model or tokenizer), model_dir=model, tokenizer_dir=tokenizer)]


def print_heading(label: str, index: int, out: TextIO) -> None:
    """`==> label <==` before each model's output when there are several, as `head` does for files."""
    if index:
        out.write("\n")
    out.write(f"==> {label} <==\n")


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    device = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cpu":
        # As stages/sample_sweep.py: decoding is a chain of ops of microseconds on a few rows, a second
        # OpenMP thread gains nothing, and when another process holds its core every op waits for it.
        torch.set_num_threads(1)
    return device


def load(source: Source, device: torch.device | None) -> Loaded:
    """The source's tokenizer, and its model on `device` (None: the tokenizer only)."""
    with _folders(source, with_model=device is not None) as (model_dir, tokenizer_dir):
        if device is not None and not all((model_dir / name).is_file() for name in MODEL_FILES):
            raise PipelineError(f"no trained model in {model_dir} ({' and '.join(MODEL_FILES)}): train it with "
                                "`dvc repro pretrain`, or fetch it with `dvc pull`")
        if not tokenizer_dir.is_dir():
            raise PipelineError(f"no tokenizer in {tokenizer_dir}: train it with `dvc repro train_bpe`, or fetch it "
                                "with `dvc pull`")
        tokenizer = load_tokenizer(tokenizer_dir)
        if device is None:
            return Loaded(source.label, tokenizer, None)
        from tinylm.model import load_trained_model

        return Loaded(source.label, tokenizer, load_trained_model(model_dir, tokenizer.fingerprint, device,
                                                                  tokenizer_dir=tokenizer_dir))


@contextlib.contextmanager
def _folders(source: Source, with_model: bool) -> Iterator[tuple[Path | None, Path]]:
    if source.rev is None:
        yield source.model_dir, source.tokenizer_dir
        return
    names = [MODEL_DIR, TOKENIZER_DIR] if with_model else [TOKENIZER_DIR]
    with tempfile.TemporaryDirectory(prefix="tinylm-rev-") as tmp:
        _fetch(source.repo, source.rev, names, Path(tmp))
        try:
            yield Path(tmp, MODEL_DIR), Path(tmp, TOKENIZER_DIR)
        except PipelineError as exc:
            # Name the files as `REV:data/model/...` rather than by a temporary path that is already gone.
            raise PipelineError(str(exc).replace(f"{tmp}/", f"{source.rev}:")) from None


def _fetch(repo: Path, rev: str, names: list[str], destination: Path) -> None:
    """Copy the folders `names` (paths in the repository) as they were at `rev` under `destination`."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from dvc_data.index.index import DataIndexError

    try:
        fs = DVCFileSystem(str(repo), rev=rev)
        missing = [name for name in names if not fs.isdir(name)]
    except DvcException as exc:
        raise PipelineError(f"--rev {rev}: {exc} (list revisions with `git branch -a`, `git tag` and `dvc exp list`)"
                            ) from None
    if missing:
        what = "trained model" if MODEL_DIR in missing else "tokenizer"
        raise PipelineError(f"revision {rev} has no {what} ({missing[0]} is not tracked there): pick a revision where "
                            "the pipeline ran and was committed, e.g. one that `dvc exp show` lists")
    for name in names:
        try:
            fs.get(name, str(destination / name), recursive=True)
        except (FileNotFoundError, DataIndexError, DvcException) as exc:
            raise PipelineError(f"{rev}:{name} is in neither the DVC cache nor the remote ({exc}): fetch it with "
                                f"`dvc fetch --all-commits`, or `dvc exp pull <git remote> {rev}` for an experiment"
                                ) from None
