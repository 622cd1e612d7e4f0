"""Stories sampled at milestones: when, what a row holds, and that sampling never touches training
(weights, metrics, model.pt bytes and resume are the same with it on or off; under DDP one rank samples).

Run as a script, this file is the torchrun worker of the DDP test: `python -m torch.distributed.run
--standalone --nproc_per_node=2 tests/test_milestone_samples.py OUT_DIR`.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tinylm.model import GPT, save_model
from tinylm.records.io import read_records
from tinylm.records.milestones import MilestoneSample
from tinylm.tokenizer.bpe import Tokenizer
from tinylm.training import milestones
from tinylm.training.milestones import console_lines, is_milestone, sample_milestone
from tinylm.training.trainer import TrainingInterrupted, train
from trainer_helpers import (METRICS, RESUME_PARAMS, TOKENIZER_FINGERPRINT, TRAIN, VAL, after_step, dropout_config,
                             logged, make_trainer, replace, workdir)  # noqa: F401 - workdir: the stage fixture

# Byte-level: every id of the trainer tests' token streams (< 61) decodes, and <|endoftext|> is 256.
TOKENIZER = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
CONFIG = dataclasses.replace(dropout_config(), vocab_size=TOKENIZER.vocab_size)  # dropout: the RNG matters
SAMPLING = replace(RESUME_PARAMS, sample_interval=5, sample_prompts=["Once upon a time", "A dog"], sample_tokens=6)
MILESTONES = [0, 5, 10, 15, 18]  # max_steps 18: the end is a milestone of its own


def run_samples(run_dir: Path, train_params=SAMPLING):
    result = make_trainer(run_dir, train_params, CONFIG, tokenizer=TOKENIZER).run()
    return result, run_dir / "reports" / "samples.jsonl"


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """An uninterrupted run with sampling on, and its console output."""
    directory = tmp_path_factory.mktemp("sampled")
    return directory, *run_samples(directory)


def test_milestones_are_step_0_every_interval_and_the_end():
    assert [s for s in range(19) if is_milestone(s, SAMPLING)] == MILESTONES
    assert [s for s in range(17) if is_milestone(s, replace(SAMPLING, max_steps=16, sample_interval=4))] == [
        0, 4, 8, 12, 16]
    assert not any(is_milestone(s, replace(SAMPLING, sample_interval=0)) for s in range(19))


def test_a_row_per_milestone_prompt_and_strategy(sampled):
    run_dir, _, path = sampled
    rows = read_records(path, MilestoneSample, "pretrain")
    expected = [(step, prompt, strategy) for step in MILESTONES for prompt in SAMPLING.sample_prompts
                for strategy in ("greedy", "min_p_0.05")]
    assert [(r.step, r.prompt, r.strategy) for r in rows] == expected
    for row in rows:
        assert row.seed == (None if row.strategy == "greedy" else SAMPLING.seed)
        assert row.tokens == SAMPLING.sample_tokens or (row.stopped_at_eot and row.tokens < SAMPLING.sample_tokens)
        assert row.mean_logprob < 0
    # The run learned the stream's rule (next = 3 * prev + 1 mod 61): its greedy story gets likelier.
    greedy = [r for r in rows if r.strategy == "greedy" and r.prompt == "A dog"]
    assert greedy[-1].mean_logprob > greedy[0].mean_logprob


def test_the_console_prints_the_stories_under_the_validation_line(tmp_path, capsys):
    run_samples(tmp_path, replace(SAMPLING, max_steps=6, sample_interval=5))
    lines = capsys.readouterr().out.splitlines()
    rows = read_records(tmp_path / "reports" / "samples.jsonl", MilestoneSample, "pretrain")
    for step in (0, 5, 6):
        at = lines.index(next(line for line in lines if line.startswith(f"step {step:>6}/6 | val loss")))
        shown = console_lines([r for r in rows if r.step == step])
        assert lines[at + 1:at + 1 + len(shown)] == shown
    assert shown[0].startswith("  greedy     | Once upon a time") and shown[1].startswith("  min_p_0.05 | Once")


def test_sampling_leaves_the_model_mode_the_rng_and_the_thread_count_as_it_found_them():
    torch.manual_seed(0)
    model = GPT(CONFIG).train()
    weights = {name: p.clone() for name, p in model.state_dict().items()}
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = sample_milestone(model, TOKENIZER, ["Once"], 5, seed=7, step=3)
        assert model.training and torch.get_num_threads() == 2
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(p, weights[name]) for name, p in model.state_dict().items())
        assert sample_milestone(model.eval(), TOKENIZER, ["Once"], 5, seed=7, step=3) == first  # seeded
        assert not model.training
    finally:
        torch.set_num_threads(threads)


def test_weights_metrics_and_model_pt_bytes_are_the_same_with_sampling_on_or_off(sampled, tmp_path):
    run_dir, on, _ = sampled
    off, off_file = run_samples(tmp_path, replace(SAMPLING, sample_interval=0))
    assert off_file.read_text() == ""  # a declared output, written empty
    for name in METRICS:
        assert logged(run_dir, name) == logged(tmp_path, name), name  # exactly
    for (name, p), q in zip(on.model.state_dict().items(), off.model.state_dict().values()):
        assert torch.equal(p, q), name
    save_model(on.model, tmp_path / "on.pt", extra={"steps": on.steps})
    save_model(off.model, tmp_path / "off.pt", extra={"steps": off.steps})
    assert (tmp_path / "on.pt").read_bytes() == (tmp_path / "off.pt").read_bytes()


def test_a_signal_and_the_resume_give_the_same_stories_and_weights(sampled, tmp_path, monkeypatch):
    reference_dir, reference, reference_file = sampled
    after_step(monkeypatch, 9, lambda trainer: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingInterrupted):
        run_samples(tmp_path)
    monkeypatch.undo()
    resumed, path = run_samples(tmp_path)
    assert path.read_bytes() == reference_file.read_bytes()
    for p, q in zip(reference.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    for name in METRICS:
        assert logged(reference_dir, name) == logged(tmp_path, name), name


@pytest.mark.parametrize("file_deleted", [False, True], ids=["stale-file-kept", "file-deleted-by-dvc"])
def test_a_crash_resumes_without_repeating_or_losing_a_milestone(sampled, tmp_path, monkeypatch, file_deleted):
    """The crash after step 10 leaves the checkpoint of step 8 and a file with step 10's rows already in it."""
    _, _, reference_file = sampled

    def crash(trainer):
        raise RuntimeError("simulated crash")

    after_step(monkeypatch, 10, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_samples(tmp_path)
    monkeypatch.undo()
    path = tmp_path / "reports" / "samples.jsonl"
    assert {r.step for r in read_records(path, MilestoneSample, "pretrain")} == {0, 5, 10}
    if file_deleted:
        path.unlink()  # dvc repro deletes a stage's outputs before rerunning it
    run_samples(tmp_path)
    assert path.read_bytes() == reference_file.read_bytes()


def test_the_pretrain_stage_prints_and_writes_the_stories(workdir, repo_root):  # noqa: F811
    params_yaml = yaml.safe_load((workdir / "params.yaml").read_text())
    params_yaml["train"].update(max_steps=20, eval_interval=10, sample_interval=10, sample_tokens=8)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params_yaml, sort_keys=False))
    done = subprocess.run([sys.executable, str(repo_root / "stages" / "pretrain.py")], cwd=workdir,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_records(workdir / "reports" / "train" / "samples.jsonl", MilestoneSample, "pretrain")
    assert [(r.step, r.strategy) for r in rows] == [(s, k) for s in (0, 10, 20) for k in ("greedy", "min_p_0.05")]
    lines = done.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("step     20/20 | val loss"))
    assert lines[at + 1].startswith("  greedy     | Once upon a time")


# --- DDP ------------------------------------------------------------------------------------------

DDP_PARAMS = replace(SAMPLING, micro_batch_size=2, grad_accum_steps=2, max_steps=10, checkpoint_interval=5)


def worker(out_dir: Path) -> None:
    """One rank: counts its own calls of the sampler, then trains with sampling on."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    calls = []
    real = milestones.sample_milestone
    milestones.sample_milestone = lambda *args, **kwargs: calls.append(args[-1]) or real(*args, **kwargs)
    result = train(CONFIG, DDP_PARAMS, TRAIN, VAL, checkpoint_path=out_dir / "ckpt" / "last.pt",
                   log_dir=out_dir / "reports", tokenizer_fingerprint=TOKENIZER_FINGERPRINT, tokenizer=TOKENIZER)
    (out_dir / f"sampled_steps_{rank}.txt").write_text(" ".join(map(str, calls)))
    if result.writes_outputs:
        torch.save(result.model.state_dict(), out_dir / "final.pt")


@pytest.mark.slow
def test_under_ddp_only_the_writing_rank_samples(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__)), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "sampled_steps_0.txt").read_text() == "0 5 10"
    assert (tmp_path / "sampled_steps_1.txt").read_text() == ""  # rank 1 went on to the next all-reduce
    assert done.stdout.count("  greedy ") == 3 * len(DDP_PARAMS.sample_prompts)  # printed once per milestone
    rows = read_records(tmp_path / "reports" / "samples.jsonl", MilestoneSample, "pretrain")
    assert sorted({r.step for r in rows}) == [0, 5, 10]
    model = GPT(CONFIG)
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))
    final = sample_milestone(model, TOKENIZER, DDP_PARAMS.sample_prompts, DDP_PARAMS.sample_tokens,
                             DDP_PARAMS.seed, 10)
    assert [r for r in rows if r.step == 10] == final  # sampled from the trained weights, after the last step


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
