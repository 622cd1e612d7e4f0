"""The data stages at scale: download -> clean -> train_bpe -> encode_shards on TinyStories-like corpora.

A corpus of scale k is k copies of the shared train sample (5,317 stories, 4.5 MB), each copy with
3% of its words perturbed (one letter replaced, seeded per copy), so that the distinct pre-tokens
grow with the corpus as they do in real data instead of repeating the same 8.7k words. The
validation split stays the shared one (1,728 stories): the real one is ~1% of the train split.

Each corpus is written in the hub's layout (`data/train-NNNNN-of-NNNNN.parquet`, row groups of
1,000 stories as `datasets` writes them, and the shared validation parquet), and the real stage
scripts run on it in a fresh workspace, one after another, offline, exactly as `dvc repro` runs
them: params.yaml is the repository's with `data.sources` pointing at that folder and
`data.max_train_stories` raised to take every story. Per stage: wall time; CPU time (user +
system of all its processes, which other jobs on the cores inflate far less than wall time); the
peak RSS of its largest process (what `/usr/bin/time` reports) and the peak of the sum over its
processes (main and workers, PSS sampled every 0.2 s, so shared pages count once); and the load
average as it started.

Targets (exit code 1 if one is missed): the 40x corpus (182 MB) prepared in <= 60 s; every
stage's peak RSS (largest process, and the sum) <= 512 MB at every scale; time linear in input
(the 40x time / the 10x time <= 4.4).

    .venv/bin/python benchmarks/bench_data_scale.py [--scales 1 10 40] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import yaml

from tinylm.corpus.formats import iter_eot_stories

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data/tinystories"
STAGES = ("download", "clean", "train_bpe", "encode_shards")
PERTURBED = 0.03
ROW_GROUP = 1000  # `datasets` writes parquet in batches of 1,000 rows, one row group each
ROWS_PER_FILE = 50_000
TARGET_SECONDS, TARGET_SCALE = 60.0, 40
TARGET_MB = 512.0
TARGET_RATIO, RATIO_SCALES = 4.4, (10, 40)
_WORD = re.compile(r"([A-Za-z]{2,})")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class StageRun:
    scale: int
    stage: str
    seconds: float
    cpu_seconds: float  # user + system time of all its processes: what an idle machine would spend
    max_rss_mb: float  # the largest process
    tree_pss_mb: float  # all its processes together, sampled
    load: float  # the 1-minute load average as the stage started: other jobs slow it down


def perturbed_copy(pieces: list[str], copy: int) -> list[str]:
    """The sample's pieces (alternating separators and words) with PERTURBED of the words changed."""
    rng = random.Random(copy)
    pieces = list(pieces)
    for i in range(1, len(pieces), 2):
        if rng.random() < PERTURBED:
            word = pieces[i]
            at = rng.randrange(len(word))
            pieces[i] = word[:at] + rng.choice(_LETTERS) + word[at + 1:]
    return pieces


def write_hub_folder(folder: Path, scale: int) -> int:
    """The scale-k corpus in the hub's layout; returns the number of train stories."""
    stories = list(iter_eot_stories(SAMPLE / "TinyStories-train-sample.txt"))
    # One string split once; NUL (in no story) marks where each story ends.
    pieces = _WORD.split("\0".join(stories))
    total = scale * len(stories)
    files = -(-total // ROWS_PER_FILE)
    rows: list[str] = []
    written = 0

    def flush(final: bool) -> None:
        nonlocal rows, written
        while len(rows) >= ROWS_PER_FILE or (final and rows):
            name = f"train-{written:05d}-of-{files:05d}.parquet"
            datasets.Dataset.from_dict({"text": rows[:ROWS_PER_FILE]}).to_parquet(
                folder / "data" / name, batch_size=ROW_GROUP)
            rows = rows[ROWS_PER_FILE:]
            written += 1

    (folder / "data").mkdir(parents=True)
    for copy in range(scale):
        rows.extend("".join(perturbed_copy(pieces, copy)).split("\0"))
        flush(final=False)
    flush(final=True)
    shutil.copy(SAMPLE / "data/validation-00000-of-00001.parquet", folder / "data")
    return total


def write_workspace(workspace: Path, hub: Path, train_stories: int) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # As a user runs it offline: the hub first (skipped at once), then the local copy.
    params["data"].update(sources=["roneneldan/TinyStories", str(hub)], max_train_stories=train_stories)
    workspace.mkdir(parents=True)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _tree_pss_kib(root: int) -> int:
    total = 0
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def run_stage(stage: str, workspace: Path, env: dict[str, str], scale: int, log: Path) -> StageRun:
    """Run one stage script under /usr/bin/time, sampling its process tree's memory meanwhile."""
    timing = workspace / f".time_{stage}"
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "a") as out:
        process = subprocess.Popen(["/usr/bin/time", "-f", "%U %S %M", "-o", str(timing), sys.executable,
                                    str(REPO / "stages" / f"{stage}.py")], cwd=workspace, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.2):
                peak = max(peak, _tree_pss_kib(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    if code != 0:
        sys.exit(f"{stage} failed at scale {scale}x (exit {code}); its output is in {log}")
    user, system, max_rss_kib = timing.read_text().split()[-3:]
    return StageRun(scale, stage, seconds, float(user) + float(system), int(max_rss_kib) * 1024 / 1e6,
                    peak * 1024 / 1e6, load)


def run_scale(scale: int, root: Path) -> tuple[float, list[StageRun]]:
    hub, workspace = root / f"hub_x{scale}", root / f"workspace_x{scale}"
    started = time.perf_counter()
    stories = write_hub_folder(hub, scale)
    megabytes = sum(p.stat().st_size for p in (hub / "data").glob("train-*.parquet")) / 1e6
    print(f"{scale}x: {stories} train stories in {hub} ({megabytes:.0f} MB of parquet, "
          f"built in {time.perf_counter() - started:.0f} s)", flush=True)
    write_workspace(workspace, hub, stories)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf_home"),
               TIKTOKEN_CACHE_DIR=str(SHARED / "tiktoken-cache"))
    runs = []
    for stage in STAGES:
        result = run_stage(stage, workspace, env, scale, root / f"x{scale}.log")
        print(f"  {stage}: {result.seconds:.1f} s ({result.cpu_seconds:.1f} s of CPU), largest process "
              f"{result.max_rss_mb:.0f} MB, "
              f"all processes {result.tree_pss_mb:.0f} MB (load average {result.load:.1f})", flush=True)
        runs.append(result)
    text_mb = (workspace / "data/clean/train.txt").stat().st_size / 1e6
    shards = len(list((workspace / "data/shards").glob("train_*.bin")))
    print(f"  -> data/clean/train.txt {text_mb:.1f} MB, {shards} train shard(s)", flush=True)
    return (workspace / "data/raw/train.jsonl").stat().st_size / 1e6, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 40])
    parser.add_argument("--keep", type=Path, help="build in this (new) folder and keep it, instead of a temp folder")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; params.yaml as in the repository but for data.sources and "
          "data.max_train_stories\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        results = {scale: run_scale(scale, root) for scale in args.scales}

    print("\n| input (train.jsonl) | stage | seconds | CPU seconds | peak RSS, largest process (MB) "
          "| peak, all processes (MB) | load average at start |")
    print("|---|---|---:|---:|---:|---:|---:|")
    totals = {}
    for scale, (megabytes, runs) in results.items():
        for run in runs:
            print(f"| {scale}x ({megabytes:.0f} MB) | {run.stage} | {run.seconds:.1f} | {run.cpu_seconds:.1f} | "
                  f"{run.max_rss_mb:.0f} | "
                  f"{run.tree_pss_mb:.0f} | {run.load:.1f} |")
        totals[scale] = sum(run.seconds for run in runs)
        print(f"| {scale}x ({megabytes:.0f} MB) | **all four** | **{totals[scale]:.1f}** | "
              f"{sum(r.cpu_seconds for r in runs):.1f} | {max(r.max_rss_mb for r in runs):.0f} | "
              f"{max(r.tree_pss_mb for r in runs):.0f} | |")

    missed = []
    peak = max(max(r.max_rss_mb, r.tree_pss_mb) for _, runs in results.values() for r in runs)
    print(f"\npeak memory of any stage: {peak:.0f} MB (target <= {TARGET_MB:.0f} MB)")
    if peak > TARGET_MB:
        missed.append("memory")
    if TARGET_SCALE in totals:
        print(f"{TARGET_SCALE}x prepared in {totals[TARGET_SCALE]:.1f} s (target <= {TARGET_SECONDS:.0f} s)")
        if totals[TARGET_SCALE] > TARGET_SECONDS:
            missed.append("time")
    low, high = RATIO_SCALES
    if low in totals and high in totals:
        ratio = totals[high] / totals[low]
        print(f"{high}x / {low}x time: {ratio:.2f} (target <= {TARGET_RATIO}, linear is {high / low:.1f})")
        if ratio > TARGET_RATIO:
            missed.append("linearity")
    if missed:
        sys.exit(f"target missed: {', '.join(missed)}")


if __name__ == "__main__":
    main()
