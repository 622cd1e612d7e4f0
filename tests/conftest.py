"""Shared fixtures: the environment every test starts from, paths to the repository and to ../shared
(the offline data and GPT-2 files)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"

# The variables of the caller's environment that change what the code under test does, and the value
# every test starts from whatever the caller has set (None: unset). A test that needs another value sets
# it with monkeypatch. `make test-offline-env` runs the fast tests again under an offline user's values.
HERMETIC_ENV: dict[str, str | None] = {
    # Unset: the code paths that probe the hub run; the endpoint below refuses at once, so none waits.
    "HF_HUB_OFFLINE": None,
    "HF_DATASETS_OFFLINE": None,
    "HF_ENDPOINT": "http://127.0.0.1:9",  # the discard port: connection refused, no network ever
    # A cache of the suite's own (removed at exit): nothing read from, or written to, the caller's.
    "HF_HOME": tempfile.mkdtemp(prefix="tinylm-tests-hf-home-"),
    "TIKTOKEN_CACHE_DIR": str(SHARED_DIR / "tiktoken-cache"),  # GPT-2's files, offline
    "CUDA_VISIBLE_DEVICES": "",  # CPU everywhere: the expected numbers are the CPU's
    # Unset: `tinylm score` and `tinylm serve` set it in their own process to hide tqdm, and a test that runs
    # them in-process would otherwise leave every later subprocess of its worker without progress bars.
    "TQDM_DISABLE": None,
    # One thread per process, stage subprocesses included: pytest-xdist already keeps both cores busy,
    # and tiny ops on a second OpenMP thread spin-wait for a busy core (modules ran 20x slower).
    "OMP_NUM_THREADS": "1",
}
atexit.register(shutil.rmtree, HERMETIC_ENV["HF_HOME"], ignore_errors=True)


def start_environment(setenv, delenv) -> None:
    for name, value in HERMETIC_ENV.items():
        if value is None:
            delenv(name)
        else:
            setenv(name, value)


# Once at import, before collection: libraries read some of these when first imported (torch counts the
# GPUs once, huggingface_hub reads HF_HOME and the offline switches into constants), and session
# fixtures run before the per-test fixture below.
start_environment(os.environ.__setitem__, lambda name: os.environ.pop(name, None))

import torch  # noqa: E402  (after CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS are set)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch):
    """Every test starts from HERMETIC_ENV, whatever the caller or an earlier test set; undone after it."""
    start_environment(monkeypatch.setenv, lambda name: monkeypatch.delenv(name, raising=False))


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

    from tinylm.model import save_trained_model
    from tinylm.records.model import TrainingSummary

    summary = TrainingSummary(config=dataclasses.asdict(model.config), params=model.num_params(),
                              params_without_embeddings=model.num_params(include_embeddings=False), steps=0,
                              tokens_trained=0, final_train_loss=math.log(tokenizer.vocab_size),
                              final_val_loss=math.log(tokenizer.vocab_size), tokenizer_fingerprint=tokenizer.fingerprint)
    save_trained_model(model, directory, summary)
    return directory


def our_bin_env() -> dict[str, str]:
    """The environment with the test interpreter's bin/ first on PATH, so `python` and `dvc` are ours."""
    import sys

    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def run_cmd(args: list[str], cwd: Path, timeout: float = 600) -> str:
    """Run a command with our bin/ first on PATH; return stdout+stderr, failing the test with that output
    if the command fails."""
    import subprocess

    done = subprocess.run(args, cwd=cwd, env=our_bin_env(), capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{output}")
    return output


def commit(repo: Path, message: str) -> None:
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)


def tiny_copy(destination: Path) -> Path:
    """A fresh copy of the project (`copy_repo`) with params.yaml composed on the tiny profile, committed."""
    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    repo = copy_repo(destination)
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base=None):
        tiny = OmegaConf.to_container(compose(config_name="config", overrides=["profile=tiny"]))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    commit(repo, "tiny profile")
    return repo


def run_queue(repo: Path, workers: int, timeout: float = 600) -> str:
    """`dvc queue start -j workers`, then wait until nothing is queued or running; the final `dvc queue status`."""
    import re
    import subprocess
    import tempfile
    import time

    # The workers it spawns inherit its stdout: through a pipe, reading it would wait for the last worker.
    with tempfile.TemporaryFile("w+") as log:
        started = subprocess.run(["dvc", "queue", "start", "-j", str(workers)], cwd=repo, env=our_bin_env(),
                                 stdout=log, stderr=subprocess.STDOUT, timeout=120)
        log.seek(0)
        assert started.returncode == 0, log.read()
    deadline = time.monotonic() + timeout
    while True:
        polled = subprocess.run(["dvc", "queue", "status"], cwd=repo, capture_output=True, text=True, timeout=120,
                                env=our_bin_env())
        status = polled.stdout + polled.stderr
        # DVC reads a running task's info file as the task writes it, so a poll can fail ("Expecting value"):
        # a failed poll counts as busy and is asked again; the deadline still bounds the wait.
        busy = polled.returncode != 0 or re.search(r"\b(Queued|Running)\b", status)
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(3)
    run_cmd(["dvc", "queue", "stop"], repo)  # no idle worker left behind
    return status
