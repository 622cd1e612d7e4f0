"""stages/pretrain.py end to end on a byte-level tokenizer: outputs, SIGINT, and the rerun that resumes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from tinylm.model import load_model
from trainer_helpers import STAGE_MAX_STEPS as MAX_STEPS, workdir  # noqa: F401 - the fixture


def start(workdir, repo_root):
    return subprocess.Popen([sys.executable, str(repo_root / "stages" / "pretrain.py")], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigint_saves_exits_nonzero_and_the_rerun_resumes_to_the_same_outputs(workdir, repo_root):
    process = start(workdir, repo_root)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("step     20/"):
            process.send_signal(signal.SIGINT)
            break
    output = "".join(seen) + process.stdout.read()
    assert process.wait(timeout=120) == 2, output
    assert "stopped by a signal" in output
    checkpoint = workdir / "checkpoints" / "pretrain" / "last.pt"
    assert checkpoint.exists() and not (workdir / "data" / "model").exists()

    process = start(workdir, repo_root)
    output = process.stdout.read()
    assert process.wait(timeout=300) == 0, output
    assert "resuming" in output
    assert not checkpoint.exists()  # scratch state is deleted after success

    summary = json.loads((workdir / "data" / "model" / "model.json").read_text())
    assert summary["steps"] == MAX_STEPS and summary["tokens_trained"] == MAX_STEPS * 4 * 32
    assert summary["config"]["vocab_size"] == 257 and summary["params"] > summary["params_without_embeddings"]
    model = load_model(workdir / "data" / "model" / "model.pt")
    assert model.num_params() == summary["params"]
    metrics = json.loads((workdir / "reports" / "train" / "metrics.json").read_text())
    assert metrics["step"] == MAX_STEPS and metrics["val_loss"] == pytest.approx(summary["final_val_loss"])
    assert metrics["val_loss"] < np.log(257) - 1.0  # it learned something about English bytes
    steps = [int(row.split("\t")[0]) for row in
             (workdir / "reports" / "train" / "plots" / "metrics" / "train_loss.tsv").read_text().split("\n")[1:] if row]
    assert steps == list(range(MAX_STEPS))  # one row per step, none lost or repeated by the resume


def test_missing_shards_is_a_clear_error(workdir, repo_root):
    for shard in (workdir / "data" / "shards").iterdir():
        shard.unlink()
    done = subprocess.run([sys.executable, str(repo_root / "stages" / "pretrain.py")], cwd=workdir,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "encode_shards" in done.stderr
