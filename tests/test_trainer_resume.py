"""Checkpoints: exact resume after SIGINT/SIGTERM or a crash, fingerprint gating, NaN stops, atomic saves."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tinylm.training.checkpoint import (Position, load_checkpoint, read_checkpoint, remove_stale_temp_files,
                                       save_checkpoint)
from tinylm.training.trainer import TrainingDiverged, TrainingInterrupted
from trainer_helpers import (RESUME_PARAMS, after_step, assert_same_history, dropout_config, logged,
                             make_trainer, params, replace, run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    return directory, run(directory, RESUME_PARAMS, dropout_config())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_rerun_continues_identically(tmp_path, monkeypatch, reference, signum, capsys):
    reference_dir, reference_result = reference
    after_step(monkeypatch, 9, lambda trainer: os.kill(os.getpid(), signum))
    with pytest.raises(TrainingInterrupted, match="after step 10"):  # the signal lands during step 9's tail
        run(tmp_path, RESUME_PARAMS, dropout_config())
    checkpoint = read_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert checkpoint["step"] == 11
    assert signal.getsignal(signum) is not None  # handlers restored
    monkeypatch.undo()

    resumed = run(tmp_path, RESUME_PARAMS, dropout_config())
    assert "resuming" in capsys.readouterr().out
    largest = assert_same_history(reference_dir, tmp_path)
    print(f"largest resume difference: {largest:.3g}")
    for p, q in zip(reference_result.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_captured_state_restored_into_a_fresh_trainer_takes_the_same_next_step(tmp_path):
    trainer = make_trainer(tmp_path / "first", RESUME_PARAMS, dropout_config())
    for _ in range(3):
        trainer.train_step()
    position = Position(trainer.step, trainer.tokens, 12.5, [{"step": 0, "val_loss": 4.0}])
    # Through the file, as a resume goes: the captured tensors are the live ones, which the next step changes.
    save_checkpoint(tmp_path / "saved.pt", trainer.checkpoint.capture(position))
    expected = trainer.train_step()

    fresh = make_trainer(tmp_path / "fresh", RESUME_PARAMS, dropout_config())
    state = load_checkpoint(tmp_path / "saved.pt", fresh.checkpoint.inputs)  # same run, same fingerprint
    assert fresh.checkpoint.restore(state) == position
    fresh.step, fresh.tokens = position.step, position.tokens
    got = fresh.train_step()
    assert (got.loss, got.grad_norm, got.lr) == (expected.loss, expected.grad_norm, expected.lr)  # bitwise
    for (name, p), q in zip(trainer.model.named_parameters(), fresh.model.parameters()):
        assert torch.equal(p, q), name


def test_crash_resumes_from_last_periodic_checkpoint_without_duplicate_rows(tmp_path, monkeypatch, reference):
    """A crash after step 10 loses steps 9-10 (checkpoint at 8); dvclive rows logged for them are rewritten."""
    reference_dir, _ = reference

    def crash(trainer):
        raise RuntimeError("simulated crash")

    after_step(monkeypatch, 10, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, RESUME_PARAMS, dropout_config())
    assert read_checkpoint(tmp_path / "ckpt" / "last.pt")["step"] == 8
    monkeypatch.undo()
    run(tmp_path, RESUME_PARAMS, dropout_config())
    assert_same_history(reference_dir, tmp_path)  # also fails on any repeated step


def test_checkpoint_of_other_params_is_discarded_with_a_message(tmp_path, monkeypatch, capsys):
    p = params(max_steps=10, checkpoint_interval=3)
    after_step(monkeypatch, 4, lambda trainer: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, p)
    monkeypatch.undo()
    capsys.readouterr()

    # checkpoint_interval does not shape training: the checkpoint is still resumed.
    trainer = make_trainer(tmp_path, replace(p, checkpoint_interval=7))
    assert trainer.step == 6

    other = replace(p, lr=1e-3)
    trainer = make_trainer(tmp_path, other)
    out = capsys.readouterr().out
    assert "discarding" in out and "train.lr: 0.003 -> 0.001" in out
    assert trainer.step == 0 and not (tmp_path / "ckpt" / "last.pt").exists()
    fresh_dir = tmp_path / "fresh"
    run(fresh_dir, other)
    trainer.run()
    assert logged(tmp_path, "train_loss") == logged(fresh_dir, "train_loss")


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    p = params(max_steps=12, checkpoint_interval=4)

    def poison(trainer):
        with torch.no_grad():
            trainer.model.blocks[0].mlp.fc.weight.fill_(float("nan"))

    after_step(monkeypatch, 5, poison)
    with pytest.raises(TrainingDiverged, match="at step 6"):
        run(tmp_path, p)
    state = read_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_unreadable_checkpoint_is_discarded(tmp_path, capsys):
    path = tmp_path / "last.pt"
    path.write_bytes(b"torn write")
    assert load_checkpoint(path, {"any": 1}) is None
    assert "unreadable" in capsys.readouterr().out and not path.exists()


SAVE_LOOP = textwrap.dedent("""
    import sys, torch
    from tinylm.training.checkpoint import save_checkpoint
    i = 0
    while True:
        save_checkpoint(sys.argv[1], {"i": i, "blob": torch.full((1_000_000,), float(i))})
        print(i, flush=True)
        i += 1
""")


@pytest.mark.slow
def test_kill_9_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    for delay in (0.0, 0.07, 0.19):
        process = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline()  # at least one save completed
        time.sleep(delay)
        process.kill()  # SIGKILL, mid-save or not
        process.wait()
        state = read_checkpoint(path)
        assert torch.equal(state["blob"], torch.full((1_000_000,), float(state["i"])))
    # A killed save may leave its temp file behind; the trainer removes such leftovers.
    save_checkpoint(path, {"i": -1})
    remove_stale_temp_files(path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
