"""The execution-only params change how a stage runs, never a byte it writes (timings aside).

dvc.yaml declares them for no stage, so changing one reruns nothing (tests/test_workflow.py checks
that with `dvc status`); these tests prove that leaving them out is right: each is changed and the
outputs are compared byte for byte. train.compile is not among them: compiled kernels round
differently (measured: weights differ by ~1e-5 after 8 steps on CPU), so it is declared.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tinylm.corpus.formats import iter_eot_stories
from tinylm.model import save_model
from trainer_helpers import CONFIG, logged, params, run

TIMINGS = {"train_seconds", "seconds", "mb_per_s", "tokens_per_s", "mfu", "elapsed_s"}
TRAIN_METRICS = ("train_loss", "val_loss", "lr", "grad_norm", "tokens")


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    return value


@pytest.mark.parametrize("knob, value", [("checkpoint_interval", 1), ("activation_checkpointing", True)])
def test_training_knob_leaves_weights_model_file_and_logs_unchanged(tmp_path, knob, value):
    config = dataclasses.replace(CONFIG, dropout=0.1)  # dropout draws random numbers: they must not shift
    base = params(max_steps=10, checkpoint_interval=10)
    runs = {}
    for name, train_params in (("base", base), ("changed", dataclasses.replace(base, **{knob: value}))):
        result = run(tmp_path / name, train_params, config)
        save_model(result.model, tmp_path / name / "model.pt", extra={"steps": result.steps})
        runs[name] = result
    for key, tensor in runs["base"].model.state_dict().items():
        assert torch.equal(tensor, runs["changed"].model.state_dict()[key]), key
    assert (tmp_path / "base/model.pt").read_bytes() == (tmp_path / "changed/model.pt").read_bytes()
    for metric in TRAIN_METRICS:
        assert logged(tmp_path / "base", metric) == logged(tmp_path / "changed", metric), metric


def run_stage(name: str, workdir: Path, repo_root: Path) -> None:
    done = subprocess.run([sys.executable, str(repo_root / f"stages/{name}.py")], cwd=workdir,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def workdirs(tmp_path: Path, repo_root: Path, shared_dir: Path, section: str, key: str) -> list[Path]:
    """Two stage folders with the shared sample as clean text, differing only in `section.key` (1 vs 2)."""
    made = []
    for workers in (1, 2):
        workdir = tmp_path / f"{key}{workers}"
        clean = workdir / "data/clean"
        clean.mkdir(parents=True)
        # The whole 4.5 MB train sample: above the size where BPE counting goes parallel.
        shutil.copy(shared_dir / "data/tinystories/TinyStories-train-sample.txt", clean / "train.txt")
        shutil.copy(shared_dir / "data/tinystories/TinyStories-valid-sample.txt", clean / "val.txt")
        raw = yaml.safe_load((repo_root / "params.yaml").read_text())
        raw["tokenizer"].update(vocab_size=512, compare_vocab_sizes=[256, 384])
        raw[section][key] = workers
        (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        made.append(workdir)
    return made


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_tokenizer_workers_leave_the_tokenizer_and_its_report_unchanged(tmp_path, repo_root, shared_dir):
    one, two = workdirs(tmp_path, repo_root, shared_dir, "tokenizer", "workers")
    for workdir in (one, two):
        run_stage("train_bpe", workdir, repo_root)
    assert tree_bytes(one / "data/tokenizer") == tree_bytes(two / "data/tokenizer")
    reports = [json.loads((w / "reports/tokenizer.json").read_text()) for w in (one, two)]
    assert without_timings(reports[0]) == without_timings(reports[1])


@pytest.mark.slow
def test_shard_workers_leave_the_shards_and_their_report_unchanged(tmp_path, repo_root, shared_dir):
    one, two = workdirs(tmp_path, repo_root, shared_dir, "shards", "workers")
    run_stage("train_bpe", one, repo_root)
    shutil.copytree(one / "data/tokenizer", two / "data/tokenizer")
    for workdir in (one, two):
        run_stage("encode_shards", workdir, repo_root)
    shards = tree_bytes(one / "data/shards")
    assert shards and shards == tree_bytes(two / "data/shards")
    reports = [json.loads((w / "reports/shards.json").read_text()) for w in (one, two)]
    assert without_timings(reports[0]) == without_timings(reports[1])


@pytest.mark.slow
def test_clean_workers_leave_the_clean_text_and_its_report_unchanged(tmp_path, repo_root, shared_dir):
    outputs = []
    for workers in (1, 2, 3):
        workdir = tmp_path / f"clean{workers}"
        (workdir / "data/raw").mkdir(parents=True)
        # The whole samples, as download writes them: ~18 chunks of work for the train split.
        for split, name in (("train", "TinyStories-train-sample.txt"), ("val", "TinyStories-valid-sample.txt")):
            stories = iter_eot_stories(shared_dir / "data/tinystories" / name)
            (workdir / f"data/raw/{split}.jsonl").write_text(
                "".join(json.dumps({"text": story}, ensure_ascii=False) + "\n" for story in stories), encoding="utf-8")
        raw = yaml.safe_load((repo_root / "params.yaml").read_text())
        raw["clean"]["workers"] = workers
        (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        run_stage("clean", workdir, repo_root)
        outputs.append((tree_bytes(workdir / "data/clean"), (workdir / "reports/clean.json").read_bytes()))
    assert outputs[0][0] and outputs[0] == outputs[1] == outputs[2]
