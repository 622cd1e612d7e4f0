"""stages/pretrain.py end to end on a byte-level tokenizer: outputs, SIGINT, and the rerun that resumes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tinylm.tokenizer.bpe import Tokenizer
from tinylm.model import load_model
from tinylm.corpus.shards import write_shard

MAX_STEPS = 300


@pytest.fixture
def workdir(tmp_path, repo_root, shared_dir):
    """A stage working directory: params.yaml with a tiny model, data/tokenizer, data/shards."""
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["model"].update(n_layer=1, n_head=2, d_model=16, block_size=32)
    params["eval"]["stride"] = 32  # must fit in block_size
    params["train"].update(micro_batch_size=4, max_steps=MAX_STEPS, warmup_steps=5, eval_interval=100,
                           eval_batches=2, log_interval=1, checkpoint_interval=50)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    tokenizer.save(tmp_path / "data" / "tokenizer")
    text = (shared_dir / "data" / "tinystories" / "TinyStories-valid-sample.txt").read_text()[:40_000]
    for split, part in (("train", text[:30_000]), ("val", text[30_000:])):
        ids = np.array(tokenizer.encode(part), dtype=np.uint16)
        write_shard(tmp_path / "data" / "shards" / f"{split}_0000.bin", ids, tokenizer.vocab_size, tokenizer.fingerprint)
    return tmp_path


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
