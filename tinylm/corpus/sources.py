"""The download stage's logic: pick the first usable source, stream its stories, record provenance.

Sources are tried in the order of `data.sources`; the first usable one wins:
- a hub dataset id (`roneneldan/TinyStories`), streamed with `datasets.load_dataset(...,
  streaming=True)`. Before touching it we send one HTTPS request to the hub's API with a
  short timeout (`data.hub_timeout_s`): offline, `datasets` would otherwise sit in retries for ~25 s.
- a local folder in the hub's layout (`../shared/data/tinystories`), read by the same
  `load_dataset` call;
- `{train: FILE, validation: FILE}`, in any format of `tinylm.corpus.formats`.

The source actually used goes into `data/raw/provenance.json`, which clean depends on, so a
change of source (a different label or different bytes) reruns everything downstream.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tinylm.config import DataParams, SplitFiles
from tinylm.corpus.formats import iter_file_stories
from tinylm.errors import PipelineError
from tinylm.files import atomic_open, sha256_file
from tinylm.records.download import DownloadedSplit, Provenance
from tinylm.records.splits import Splits
from tinylm.records.io import write_record

# Our split names, and the split names of the hub's layout.
HUB_SPLITS = {"train": "train", "val": "validation"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Rows read at a time from the hub or a folder: the size of the row groups `datasets` writes, so memory
# stays at about one row group's text (~1 MB for TinyStories).
ROWS_PER_BATCH = 1000


@dataclass(frozen=True)
class Source:
    kind: str  # "hub", "folder" or "files"
    label: str  # as written in params (recorded in provenance, so the same wherever the stage runs)
    files: SplitFiles | None = None  # "files": resolved paths of both splits
    folder: Path | None = None  # "folder": its resolved path
    revision: str | None = None  # the hub's commit sha, read it at that revision


def workspace_root(cwd: Path | None = None) -> Path:
    """The folder that relative local sources in params.yaml are written against: the repository.

    Stages run in the repository root, except that `dvc exp run --temp` and queued experiments
    run them in a copy at `<repository>/.dvc/tmp/exps/[celery/]tmp<random>`, where `../shared` would
    point inside `.dvc`. From such a copy, the repository that holds it is the root.
    """
    here = (cwd or Path.cwd()).resolve()
    for folder in here.parents:
        if folder.name == "exps" and folder.parent.name == "tmp" and folder.parent.parent.name == ".dvc":
            return folder.parent.parent.parent
    return here


def local_path(path: str, root: Path) -> Path:
    expanded = Path(path).expanduser()
    return expanded if expanded.is_absolute() else root / expanded


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe_hub(name: str, timeout_s: float) -> tuple[str | None, str | None]:
    """(revision, None) when the hub answers for this dataset within the timeout, else (None, why).

    A real HTTPS request, not a TCP connect: some networks accept any connection and never answer.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            return None, f"{var} is set"
    url = f"{hub_endpoint()}/api/datasets/{name}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            info = json.load(response)
    except (OSError, ValueError) as exc:  # URLError, timeouts and bad JSON
        return None, f"no answer from {url} within {timeout_s:g} s ({getattr(exc, 'reason', exc)})"
    return info.get("sha"), None


def resolve_source(params: DataParams, root: Path | None = None) -> tuple[Source, list[str]]:
    """The first usable source, and one line per source skipped before it (why).

    Relative local paths resolve against `root` (default: `workspace_root()`)."""
    root = root or workspace_root()
    skipped: list[str] = []
    for index, entry in enumerate(params.sources):
        key = f"data.sources[{index}]"
        if isinstance(entry, SplitFiles):
            files = SplitFiles(str(local_path(entry.train, root)), str(local_path(entry.validation, root)))
            missing = [p for p in (files.train, files.validation) if not Path(p).is_file()]
            if missing:
                skipped.append(f"{key}: file not found: {', '.join(missing)}")
                continue
            return Source("files", f"train={entry.train} validation={entry.validation}", files=files), skipped
        if local_path(entry, root).is_dir():
            return Source("folder", entry, folder=local_path(entry, root)), skipped
        if _HUB_ID.match(entry) and not entry.startswith("."):
            revision, reason = probe_hub(entry, params.hub_timeout_s)
            if reason is None:
                return Source("hub", entry, revision=revision), skipped
            skipped.append(f"{key}: hub dataset {entry} unreachable: {reason}")
            continue
        skipped.append(f"{key}: {entry} is neither an existing folder (relative paths start at {root}) "
                       "nor a hub dataset id")
    raise PipelineError(
        "no usable data source in params.yaml data.sources:\n  " + "\n  ".join(skipped)
        + "\nFix: add a reachable source to data.sources, e.g. the offline copy ../shared/data/tinystories"
        " or {train: FILE, validation: FILE}."
    )


def iter_stories(source: Source, split: str, params: DataParams) -> Iterator[str]:
    """Every story of one split (`train` or `val`) of the source, in the source's order."""
    if source.kind == "files":
        path = Path(source.files.train if split == "train" else source.files.validation)
        return iter_file_stories(path, re.compile(params.story_start_regex))
    import datasets

    try:
        dataset = datasets.load_dataset(str(source.folder or source.label), split=HUB_SPLITS[split], streaming=True,
                                        revision=source.revision)
    except Exception as exc:
        raise PipelineError(f"data.sources: cannot load {source.label} split {HUB_SPLITS[split]}: {exc}") from exc
    if "text" not in (dataset.column_names or ["text"]):
        raise PipelineError(f'{source.label}: split {HUB_SPLITS[split]} has no "text" column')
    # In batches of rows: per row, `datasets` formats a dict, which takes longer than the JSON out.
    return (text for batch in dataset.iter(batch_size=ROWS_PER_BATCH) for text in batch["text"])


def download(params: DataParams, out_dir: Path, log=print) -> Provenance:
    """Write `{train,val}.jsonl` and `provenance.json` into out_dir; return the provenance record."""
    started = time.perf_counter()
    source, skipped = resolve_source(params)
    for line in skipped:
        log(f"download: skipped {line}")
    log(f"download: using {source.kind} source {source.label}")
    caps = {"train": params.max_train_stories, "val": params.max_val_stories}
    splits: dict[str, DownloadedSplit] = {}
    for split in ("train", "val"):
        path = out_dir / f"{split}.jsonl"
        count = 0
        with atomic_open(path) as f:
            for text in itertools.islice(iter_stories(source, split, params), caps[split]):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                count += 1
                if count % 50000 == 0:
                    rate = count / (time.perf_counter() - started)
                    log(f"download: {split} {count}/{caps[split]} stories ({rate:.0f}/s)")
        if count == 0:
            raise PipelineError(f"{source.label}: split {split} has no stories. Fix: check the source in data.sources.")
        splits[split] = DownloadedSplit(stories=count, bytes=path.stat().st_size, sha256=sha256_file(path))
        log(f"download: {split}: {count} stories, {splits[split].bytes / 1e6:.2f} MB")
    provenance = Provenance(source=source.label, kind=source.kind, revision=source.revision,
                            source_sha256=_source_hashes(source), splits=Splits(**splits))
    write_record(out_dir / "provenance.json", provenance)
    return provenance


def _source_hashes(source: Source) -> dict[str, str] | None:
    """For local sources, the sha256 of every file read (the hub's record is its revision)."""
    if source.kind == "files":
        return {split: sha256_file(path) for split, path in
                (("train", source.files.train), ("val", source.files.validation))}
    if source.kind == "folder":
        return {str(p.relative_to(source.folder)): sha256_file(p) for p in sorted(source.folder.rglob("*.parquet"))}
    return None
