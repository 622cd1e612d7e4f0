"""evaluate_ppl and sample_sweep end to end, as `python stages/<name>.py` in a scratch directory
holding tiny artifacts made with the real APIs (tokenizer, shards, a saved model)."""
from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import save_untrained_model
from tinylm.tokenizer.bpe import Tokenizer, load_tokenizer
from tinylm.tokenizer.train import train_bpe
from tinylm.corpus.formats import iter_eot_stories, write_eot_stories
from tinylm.model import GPT, GPTConfig, load_model
from tinylm.generation.sampling import Greedy, generate
from tinylm.corpus.shards import write_split
from tinylm.records.evaluation import EvalReport
from tinylm.records.io import read_record, read_records
from tinylm.records.sampling import GeneratedSample, SamplingReport

pytestmark = pytest.mark.slow

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, repo_root, shared_dir) -> Path:
    root = tmp_path_factory.mktemp("stages")
    stories = iter_eot_stories(shared_dir / "data/tinystories/TinyStories-valid-sample.txt")
    val, train = list(itertools.islice(stories, 20)), list(itertools.islice(stories, 150))
    write_eot_stories(root / "data/clean/val.txt", val)
    write_eot_stories(root / "data/clean/train.txt", train)
    tokenizer = Tokenizer(*train_bpe(root / "data/clean/train.txt", 300, [EOT]), [EOT])
    tokenizer.save(root / "data/tokenizer")
    for split, docs in (("val", val), ("train", train)):
        ids = [i for doc in docs for i in [*tokenizer.encode(doc), tokenizer.eot_id]]
        write_split(root / "data/shards", split, [ids], 5000, tokenizer.vocab_size, tokenizer.fingerprint)

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["model"].update(n_layer=1, n_head=2, d_model=16, block_size=32)
    params["eval"].update(batch_size=4, stride=16)
    params["sample"].update(prompts=["Once upon a time", "The dog"], num_samples=2, max_new_tokens=12,
                            temperatures=[0.8, 1.2], top_k=[10], top_p=[0.9])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # The seeded init, untrained: its perplexity must equal the untrained baseline's exactly.
    torch.manual_seed(params["train"]["seed"])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, d_model=16))
    save_untrained_model(model, tokenizer, root / "data/model")
    return root


def run_stage(repo_root: Path, workdir: Path, name: str) -> subprocess.CompletedProcess:
    # One thread: these models are tiny, and OpenMP threads waiting for a busy core (the suite runs
    # beside other work) cost more than they give.
    return subprocess.run([sys.executable, str(repo_root / "stages" / f"{name}.py")], cwd=workdir,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_evaluate_ppl_stage(repo_root, workdir):
    result = run_stage(repo_root, workdir, "evaluate_ppl")
    assert result.returncode == 0, result.stderr
    report = read_record(workdir / "reports/eval.json", EvalReport, "evaluate_ppl")
    stories = list(iter_eot_stories(workdir / "data/clean/val.txt"))
    tokenizer = load_tokenizer(workdir / "data/tokenizer")
    first_token = tokenizer.encode(stories[0])[0]
    num_tokens = sum(len(tokenizer.encode(s)) + 1 for s in stories)
    assert report.tokens_evaluated == num_tokens - 1
    assert report.bytes_evaluated == (sum(len(s.encode()) for s in stories) + len(stories)
                                      - len(tokenizer.vocab[first_token]))
    assert report.val_bpb == pytest.approx(
        report.val_loss * report.tokens_evaluated / math.log(2) / report.bytes_evaluated)
    assert report.val_ppl == pytest.approx(math.exp(report.val_loss))
    baselines = report.baselines
    # The saved model is the seeded init itself, so it scores exactly as the untrained baseline.
    assert report.val_ppl == pytest.approx(baselines.untrained.ppl, rel=1e-9)
    vocab = tokenizer.vocab_size
    assert baselines.uniform.ppl == pytest.approx(vocab)
    assert 0.8 * vocab < baselines.untrained.ppl < 1.25 * vocab
    assert baselines.unigram.ppl < 0.8 * vocab  # token frequencies alone beat uniform guessing
    assert f"ppl {report.val_ppl:.2f}" in result.stdout


def test_evaluate_ppl_stage_rejects_shards_of_another_text(repo_root, workdir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    with open(copy / "data/clean/val.txt", "a", encoding="utf-8") as f:
        f.write(f"One more story.\n{EOT}\n")
    result = run_stage(repo_root, copy, "evaluate_ppl")
    assert result.returncode == 2
    assert "error:" in result.stderr and "stale" in result.stderr and "encode_shards" in result.stderr


def test_sample_sweep_stage(repo_root, workdir):
    result = run_stage(repo_root, workdir, "sample_sweep")
    assert result.returncode == 0, result.stderr
    samples_path = workdir / "reports/samples.jsonl"
    records = read_records(samples_path, GeneratedSample, "sample_sweep")
    metrics = read_record(workdir / "reports/sampling.json", SamplingReport, "sample_sweep")
    assert {r.config for r in records} == set(metrics)
    assert len(metrics) == 8  # greedy, 2 temperatures, top-k, top-p, min-p, beam, contrastive
    deterministic = {"greedy", "beam_4", "contrastive_k4_a0p6"}
    for name, m in metrics.items():
        mine = [r for r in records if r.config == name]
        assert m.num_samples == len(mine) == (2 if name in deterministic else 4)  # per prompt: 1 or num_samples
        assert sorted({r.prompt for r in mine}) == ["Once upon a time", "The dog"]
        assert [r.seed for r in mine] == ([None, None] if name in deterministic else [0, 1, 0, 1])
        assert all(r.num_tokens <= 12 for r in mine)
        assert 0 <= m.distinct_1 <= 1 and 0 <= m.repetition_4 <= 1 and m.self_ppl >= 1
    # A story starts after <|endoftext|>, as in training: the greedy record is that continuation.
    tokenizer = load_tokenizer(workdir / "data/tokenizer")
    model = load_model(workdir / "data/model/model.pt")
    greedy = next(r for r in records if r.config == "greedy" and r.prompt == "The dog")
    expected = generate(model, [tokenizer.eot_id, *tokenizer.encode("The dog")], Greedy(), 12, tokenizer.eot_id)[0]
    assert greedy.completion == tokenizer.decode(expected.tokens)
    # Seeded: a second run writes the same samples.
    first = samples_path.read_bytes()
    assert run_stage(repo_root, workdir, "sample_sweep").returncode == 0
    assert samples_path.read_bytes() == first
