"""Shared fixtures: paths to the repository and to ../shared (the offline data and GPT-2 files)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"

# tiktoken must find GPT-2's files offline.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DIR / "tiktoken-cache"))
# One thread per process, stage subprocesses included: pytest-xdist already keeps both cores busy,
# and tiny ops on a second OpenMP thread spin-wait for a busy core (modules ran 20x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED_DIR / "data" / "tinystories").is_dir():
        pytest.fail(f"{SHARED_DIR} is missing: the tests need ../shared beside the checkout (see README)")
    return SHARED_DIR


def copy_repo(destination: Path) -> Path:
    """A fresh git repository at destination/repo holding the project's files (as a clone would),
    with destination/shared linked to ../shared so relative data paths resolve as in a checkout."""
    import shutil
    import subprocess

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO_ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    repo = destination / "repo"
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    (destination / "shared").symlink_to(SHARED_DIR)
    for args in (["init", "-q"], ["add", "-A"],
                 ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    return repo


def save_untrained_model(model, tokenizer, directory: Path) -> Path:
    """model.pt and model.json of an untrained `model` in `directory`, as stages/pretrain.py writes them
    (0 steps; both losses log(vocab size), the loss of a uniform guess)."""
    import dataclasses
    import math

    from tinylm.model import save_model
    from tinylm.records.io import plain, write_record
    from tinylm.records.model import ModelSummary

    summary = ModelSummary(config=dataclasses.asdict(model.config), params=model.num_params(),
                           params_without_embeddings=model.num_params(include_embeddings=False), steps=0,
                           tokens_trained=0, final_train_loss=math.log(tokenizer.vocab_size),
                           final_val_loss=math.log(tokenizer.vocab_size), tokenizer_fingerprint=tokenizer.fingerprint)
    save_model(model, directory / "model.pt", extra=plain(summary))
    write_record(directory / "model.json", summary)
    return directory


def run_cmd(args: list[str], cwd: Path, timeout: float = 600) -> str:
    """Run a command with the test interpreter's bin/ first on PATH (so `python` and `dvc` are ours);
    return stdout+stderr, failing the test with that output if the command fails."""
    import subprocess
    import sys

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{output}")
    return output
