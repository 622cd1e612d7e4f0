"""The encode_shards stage end to end on small inputs, run as DVC runs it (`python stages/encode_shards.py`)."""
from __future__ import annotations

import hashlib
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tinylm.tokenizer.bpe import EOT, Tokenizer, load_tokenizer
from tinylm.tokenizer.train import train_bpe
from tinylm.corpus.formats import iter_eot_stories, write_eot_stories
from tinylm.corpus.shards import ShardError, load_split, shard_path
from tinylm.records.shards import ShardsReport
from tinylm.records.io import read_record

SHARD_TOKENS = 4096


@pytest.fixture
def workdir(tmp_path: Path, repo_root: Path, shared_dir: Path) -> Path:
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["shards"] = {"shard_tokens": SHARD_TOKENS, "workers": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stories = shared_dir / "data/tinystories"
    write_eot_stories(tmp_path / "data/clean/train.txt",
                      itertools.islice(iter_eot_stories(stories / "TinyStories-train-sample.txt"), 300))
    write_eot_stories(tmp_path / "data/clean/val.txt",
                      itertools.islice(iter_eot_stories(stories / "TinyStories-valid-sample.txt"), 100))
    vocab, merges = train_bpe(tmp_path / "data/clean/train.txt", 400, [EOT])
    Tokenizer(vocab, merges, [EOT]).save(tmp_path / "data/tokenizer")
    return tmp_path


def run_stage(workdir: Path, repo_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(repo_root / "stages/encode_shards.py")], cwd=workdir,
                          capture_output=True, text=True, timeout=300)


def test_stage_writes_shards_equal_to_the_from_scratch_encoder(workdir: Path, repo_root: Path) -> None:
    # Shards of an earlier run with more shards must not survive as part of the split.
    for stale in (shard_path(workdir / "data/shards", "train", 42), shard_path(workdir / "data/shards", "val", 7)):
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"old")
    done = run_stage(workdir, repo_root)
    assert done.returncode == 0, done.stderr
    assert "encode train" in done.stderr  # progress bar

    tokenizer = load_tokenizer(workdir / "data/tokenizer")
    report = read_record(workdir / "reports/shards.json", ShardsReport, "encode_shards")
    assert report.vocab_size == tokenizer.vocab_size
    for split, count, stats in (("train", 300, report.train), ("val", 100, report.val)):
        documents = list(iter_eot_stories(workdir / f"data/clean/{split}.txt"))
        shards = load_split(workdir / "data/shards", split, tokenizer.fingerprint)
        expected = [i for doc in documents for i in [*tokenizer.encode(doc), tokenizer.eot_id]]
        np.testing.assert_array_equal(np.concatenate(shards), expected)
        assert all(s.size == SHARD_TOKENS for s in shards[:-1])
        text_bytes = sum(len(doc.encode()) for doc in documents)
        assert (stats.documents, stats.tokens, stats.text_bytes) == (count, len(expected), text_bytes)
        assert stats.shards == len(shards) == math.ceil(len(expected) / SHARD_TOKENS)
        assert stats.bytes_per_token == pytest.approx(text_bytes / (len(expected) - count), abs=1e-4)
    assert report.train.shards > 1
    assert report.val.checked_documents == 100
    assert sorted(p.name for p in (workdir / "data/shards").iterdir()) == (
        [f"train_{i:04d}.bin" for i in range(report.train.shards)]
        + [f"val_{i:04d}.bin" for i in range(report.val.shards)])

    other = hashlib.sha256(b"a retrained tokenizer").hexdigest()
    with pytest.raises(ShardError, match="rerun `dvc repro encode_shards`"):
        load_split(workdir / "data/shards", "train", other)


def test_stage_missing_input_is_one_clear_line(workdir: Path, repo_root: Path) -> None:
    (workdir / "data/clean/val.txt").unlink()
    done = run_stage(workdir, repo_root)
    assert done.returncode == 2
    assert "error: data/clean/val.txt: missing. Fix: run `dvc repro clean` first." in done.stderr
    assert "Traceback" not in done.stderr
