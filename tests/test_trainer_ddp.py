"""DDP: a 2-process gloo run under torchrun matches a 1-process run with the same effective batch.

Run as a script, this file is the torchrun worker: `python -m torch.distributed.run
--standalone --nproc_per_node=2 tests/test_trainer_ddp.py OUT_DIR SETUP`, SETUP a key of SETUPS.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinylm.config import TrainParams
from tinylm.model import GPTConfig
from tinylm.training.checkpoint import read_checkpoint
from tinylm.training.trainer import train
from trainer_helpers import CONFIG, TOKENIZER_FINGERPRINT, TRAIN, VAL, logged, params, replace, run

# The same 8 sequences per step: 2 per micro-batch x 2 accumulation steps x 2 ranks, or x 4 steps x 1 rank.
DDP_PARAMS = params(micro_batch_size=2, grad_accum_steps=2, max_steps=10, eval_interval=5, checkpoint_interval=5)
SINGLE_PARAMS = params(micro_batch_size=2, grad_accum_steps=4, max_steps=10, eval_interval=5, checkpoint_interval=5)

# (model config, train params, tolerance) per setup: GPT-2 with AdamW, and a modern model with
# Muon, whose update of the all-reduced gradient must be the same on every rank and the same as one
# process's. torch.optim.Muon orthogonalises in bfloat16, whose rounding (one ulp is 0.4%) turns the
# last-bit difference of an all-reduced gradient into a slightly different update: measured 1.1e-4
# in the train loss and 2.7e-3 in the grad norm (of ~1.5) over 10 steps, hence Muon's looser bound.
MODERN = dataclasses.replace(CONFIG, positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False)
SETUPS = {
    "adamw": (CONFIG, {}, 1e-4),
    "muon": (MODERN, {"optimizer": "muon"}, 5e-3),
}


def setup(name: str, ranks: int) -> tuple[GPTConfig, TrainParams]:
    config, overrides, _ = SETUPS[name]
    return config, replace(DDP_PARAMS if ranks == 2 else SINGLE_PARAMS, **overrides)


def worker(out_dir: Path, name: str) -> None:
    torch.set_num_threads(1)
    config, train_params = setup(name, ranks=2)
    result = train(config, train_params, TRAIN, VAL, checkpoint_path=out_dir / "ckpt" / "last.pt",
                   log_dir=out_dir / "reports", tokenizer_fingerprint=TOKENIZER_FINGERPRINT)
    if result.writes_outputs:
        torch.save(result.model.state_dict(), out_dir / "final.pt")


@pytest.mark.slow
@pytest.mark.parametrize("setup_name", SETUPS)
def test_two_process_gloo_run_matches_one_process_with_the_same_effective_batch(tmp_path, setup_name):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__)), str(tmp_path / "ddp"), setup_name]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es)" in done.stdout and done.stdout.count("model:") == 1  # rank 0 alone prints

    tolerance = SETUPS[setup_name][2]
    config, single_params = setup(setup_name, ranks=1)
    single = run(tmp_path / "single", single_params, config)
    largest = 0.0
    for name in ("train_loss", "grad_norm", "val_loss"):
        a, b = logged(tmp_path / "single", name), logged(tmp_path / "ddp", name)
        assert a.keys() == b.keys()
        largest = max(largest, max(abs(a[s] - b[s]) for s in a))
        assert largest < tolerance, name
    print(f"largest DDP vs single-process difference: {largest:.3g}")
    ddp_weights = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], p, atol=tolerance, rtol=1e-3, msg=name)
    # The checkpoint holds every rank's RNG state, written by rank 0 alone.
    checkpoint = read_checkpoint(tmp_path / "ddp" / "ckpt" / "last.pt")
    assert len(checkpoint["rng"]) == 2 and checkpoint["fingerprint_inputs"]["world_size"] == 2


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
