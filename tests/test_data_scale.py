"""The data stages at full size: parallel clean, the comparisons' bounded sample, a hub folder of many
files, many shards, and training and evaluation over many shards (resume included)."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import datasets
import ftfy
import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.config import parse_params
from tinylm.corpus import clean
from tinylm.corpus.formats import iter_eot_stories, write_eot_stories
from tinylm.corpus.parallel import ordered_map
from tinylm.corpus.shards import load_split, write_split
from tinylm.corpus.sources import download
from tinylm.evaluate import evaluate
from tinylm.model import GPT
from tinylm.records.io import read_record
from tinylm.records.tokenizer import TokenizerReport
from tinylm.tokenizer.bpe import EOT, Tokenizer, load_tokenizer
from tinylm.tokenizer.compare import sample_stories
from tinylm.tokenizer.train import train_bpe
from tinylm.training.checkpoint import read_checkpoint
from tinylm.training.batches import TokenWindows, TrainBatches
from tinylm.training.trainer import Trainer
from trainer_helpers import CONFIG, TOKENIZER_FINGERPRINT, TRAIN, VAL, logged, params

FINGERPRINT = "cd" * 32
SEPARATOR = f"\n{EOT}\n"


@pytest.fixture(scope="module")
def raw_params(repo_root):
    return yaml.safe_load((repo_root / "params.yaml").read_text())


@pytest.fixture(scope="module")
def train_stories(shared_dir) -> list[str]:
    return list(iter_eot_stories(shared_dir / "data/tinystories/TinyStories-train-sample.txt"))


def run_script(stage: str, workdir: Path, repo_root: Path) -> str:
    done = subprocess.run([sys.executable, str(repo_root / f"stages/{stage}.py")], cwd=workdir,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# clean: the fast checks equal their definitions, and any number of workers gives the same output

WHITESPACE = [chr(c) for c in range(0x3001) if chr(c).isspace()]
PIECES = WHITESPACE + list("ab1.!?\"'”’»)]&<\x00\x1b\x7féﬁ\u2028") + ["the end", "The End", "â€", "&amp;"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


def normalise_by_lines(text: str) -> str:
    """The definition normalise_whitespace speeds up: per line, runs of spaces to one, then strip."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = [re.sub(r"[^\S\n]+", " ", line).strip() for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


@settings(max_examples=3000, deadline=None)
@given(TEXT)
def test_the_fast_clean_checks_equal_their_definitions(text):
    assert clean.normalise_whitespace(text) == normalise_by_lines(text)
    odd = sum(1 for c in text if not (c.isalnum() or c.isspace() or c in clean._COMMON_PUNCTUATION))
    assert clean.nontext_fraction(text) == odd / max(len(text), 1)
    assert clean.ends_like_a_sentence(text) == bool(clean._SENTENCE_END.search(text))
    if clean.left_alone_by_ftfy(text):
        fixed = ftfy.fix_and_explain(text, clean._FTFY)
        assert fixed.text == text and not fixed.explanation


@settings(max_examples=3000, deadline=None)
@given(st.text(st.characters(max_codepoint=127)))
def test_ascii_text_that_ftfy_changes_is_never_left_alone(text):
    fixed = ftfy.fix_and_explain(text, clean._FTFY)
    if fixed.text != text or fixed.explanation:
        assert not clean.left_alone_by_ftfy(text)
    assert unicodedata.is_normalized("NFC", text)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ordered_map_keeps_the_input_order(workers):
    words = [f"story {i} " * (i % 7) for i in range(500)]
    assert list(ordered_map(str.upper, words, workers, chunk_chars=40)) == [w.upper() for w in words]


@pytest.mark.parametrize("workers", [2, 3])
def test_ordered_map_reads_at_most_two_chunks_per_worker_ahead(workers):
    pulled = 0

    def stories():
        nonlocal pulled
        for i in range(400):
            pulled += 1
            yield "x" * 10  # 10 characters: chunks of 4 stories at chunk_chars=40

    for done, _ in enumerate(ordered_map(len, stories(), workers, chunk_chars=40), start=1):
        assert pulled - done <= (2 * workers + 1) * 4


def test_clean_output_is_the_same_for_1_2_and_3_workers(raw_params, train_stories):
    """The whole train sample (about 18 chunks of work), plus the duplicates and overlap that need order."""
    stories = train_stories + train_stories[:40] + ["", "x" * 40_000]
    outputs = []
    for workers in (1, 2, 3):
        section = {**copy.deepcopy(raw_params), "clean": {**raw_params["clean"], "workers": workers}}
        report = clean.SplitReport()
        kept = list(clean.clean_split(stories, parse_params(section).clean, [EOT], report,
                                      exclude={clean.digest(train_stories[7])}))
        outputs.append((kept, report.record()))
    assert outputs[0] == outputs[1] == outputs[2]
    kept, record = outputs[0]
    assert record.dropped["duplicate"] >= 40 and record.dropped["val_overlap"] == 1
    assert record.dropped["too_long"] == 1 and record.dropped["empty"] == 1


def test_clean_workers_is_validated(raw_params):
    section = {**copy.deepcopy(raw_params), "clean": {**raw_params["clean"], "workers": 0}}
    with pytest.raises(ValueError, match=r"clean\.workers: must be >= 1"):
        parse_params(section)


# ---------------------------------------------------------------------------------------------
# train_bpe: the comparisons' sample


def eot_file(path: Path, stories: list[str]) -> Path:
    write_eot_stories(path, stories)
    return path


def test_a_corpus_that_fits_is_its_own_sample(tmp_path, train_stories):
    corpus = eot_file(tmp_path / "train.txt", train_stories[:300])
    size = corpus.stat().st_size
    for max_bytes in (size, size + 1, 10 * size):
        assert sample_stories(corpus, max_bytes, tmp_path / "sample.txt") == size
        assert (tmp_path / "sample.txt").read_bytes() == corpus.read_bytes()


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_the_sample_is_whole_stories_spread_over_the_file_within_the_bound(tmp_path, train_stories, fraction):
    train_stories = list(dict.fromkeys(train_stories))  # each story once, so that its position is known
    corpus = eot_file(tmp_path / "train.txt", train_stories)
    max_bytes = int(corpus.stat().st_size * fraction)
    written = sample_stories(corpus, max_bytes, tmp_path / "sample.txt")
    assert written == (tmp_path / "sample.txt").stat().st_size
    assert max_bytes - 10_000 < written <= max_bytes + max(len(s.encode()) + len(SEPARATOR) for s in train_stories)
    sampled = list(iter_eot_stories(tmp_path / "sample.txt"))
    # A sampled story carries the newline after the <|endoftext|> before it: the text between two
    # special tokens, the unit every trainer learns from, is kept byte for byte.
    positions = [train_stories.index(story.removeprefix("\n")) for story in sampled]
    assert positions == sorted(positions)  # in file order, each one whole
    quarter = len(train_stories) // 4
    assert all(any(q * quarter <= p < (q + 1) * quarter for p in positions) for q in range(4))
    assert sample_stories(corpus, max_bytes, tmp_path / "again.txt") == written
    assert (tmp_path / "again.txt").read_bytes() == (tmp_path / "sample.txt").read_bytes()


def test_train_bpe_trains_on_everything_and_compares_on_the_recorded_sample(tmp_path, repo_root, raw_params,
                                                                          train_stories):
    reports = {}
    for name, max_bytes in (("whole", 10**9), ("sampled", 50_000)):
        workdir = tmp_path / name
        corpus = eot_file(workdir / "data/clean/train.txt", train_stories[:400])
        eot_file(workdir / "data/clean/val.txt", train_stories[400:460])
        section = copy.deepcopy(raw_params)
        section["tokenizer"].update(vocab_size=400, compare_vocab_sizes=[256, 400], compare_max_bytes=max_bytes,
                                    workers=1)
        (workdir / "params.yaml").write_text(yaml.safe_dump(section, sort_keys=False))
        output = run_script("train_bpe", workdir, repo_root)
        reports[name] = read_record(workdir / "reports/tokenizer.json", TokenizerReport, "train_bpe")
        assert reports[name].compare_max_bytes == max_bytes
        if name == "sampled":
            assert "comparisons train on" in output
            assert 40_000 < reports[name].compare_bytes < 60_000 < corpus.stat().st_size  # within a story
        else:
            assert reports[name].compare_bytes == corpus.stat().st_size
    assert load_tokenizer(tmp_path / "whole/data/tokenizer").fingerprint == \
        load_tokenizer(tmp_path / "sampled/data/tokenizer").fingerprint
    assert reports["whole"].val_tokens == reports["sampled"].val_tokens
    assert reports["whole"].hf_bpe != reports["sampled"].hf_bpe


# ---------------------------------------------------------------------------------------------
# download: a hub folder of many files and row groups, without torch


def hub_folder(folder: Path, stories: list[str], rows_per_file: int) -> None:
    """The hub's layout, as `datasets` writes it: row groups of 1,000 rows."""
    (folder / "data").mkdir(parents=True)
    files = -(-len(stories) // rows_per_file)
    for index in range(files):
        rows = stories[index * rows_per_file:(index + 1) * rows_per_file]
        datasets.Dataset.from_dict({"text": rows}).to_parquet(
            folder / f"data/train-{index:05d}-of-{files:05d}.parquet", batch_size=1000)
    datasets.Dataset.from_dict({"text": stories[:30]}).to_parquet(folder / "data/validation-00000-of-00001.parquet")


def test_download_reads_every_file_and_row_group_of_a_hub_folder_in_order(tmp_path, raw_params, train_stories,
                                                                        monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stories = train_stories[:2500]
    hub_folder(tmp_path / "hub", stories, rows_per_file=1200)
    section = copy.deepcopy(raw_params)
    section["data"].update(sources=[str(tmp_path / "hub")], max_train_stories=2499)
    record = download(parse_params(section).data, tmp_path / "raw", log=lambda _: None)
    lines = (tmp_path / "raw/train.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == stories[:2499]
    assert record.splits.train.stories == 2499 and record.splits.val.stories == 30
    assert len(record.source_sha256) == 4  # every parquet file read is hashed


def test_the_download_stage_never_imports_torch(tmp_path, repo_root, raw_params, shared_dir):
    section = copy.deepcopy(raw_params)
    section["data"].update(sources=[str(shared_dir / "data/tinystories")], max_train_stories=20, max_val_stories=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(section, sort_keys=False))
    code = (f"import runpy, sys; runpy.run_path({str(repo_root / 'stages/download.py')!r}, run_name='__main__'); "
            "print('torch imported:', 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout  # 190 MB and 1.5 s that download never needs


# ---------------------------------------------------------------------------------------------
# encode_shards: many shards, one token stream


def test_the_token_stream_does_not_depend_on_the_shard_size(tmp_path, repo_root, raw_params, train_stories):
    streams, reports = {}, {}
    for shard_tokens in (1024, 10_000_000):
        workdir = tmp_path / str(shard_tokens)
        eot_file(workdir / "data/clean/train.txt", train_stories[:300])
        eot_file(workdir / "data/clean/val.txt", train_stories[300:360])
        vocab, merges = train_bpe(workdir / "data/clean/train.txt", 400, [EOT])
        Tokenizer(vocab, merges, [EOT]).save(workdir / "data/tokenizer")
        section = copy.deepcopy(raw_params)
        section["shards"].update(shard_tokens=shard_tokens, workers=2)
        (workdir / "params.yaml").write_text(yaml.safe_dump(section, sort_keys=False))
        run_script("encode_shards", workdir, repo_root)
        streams[shard_tokens] = {split: np.concatenate(load_split(workdir / "data/shards", split))
                                 for split in ("train", "val")}
        reports[shard_tokens] = json.loads((workdir / "reports/shards.json").read_text())
    for split in ("train", "val"):
        assert np.array_equal(streams[1024][split], streams[10_000_000][split])
        assert reports[10_000_000][split]["shards"] == 1
        assert reports[1024][split]["shards"] == -(-len(streams[1024][split]) // 1024) > 1


# ---------------------------------------------------------------------------------------------
# training and evaluation over many shards


def cut(tokens: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(tokens, np.cumsum(sizes)[:-1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=30), st.integers(1, 12))
def test_windows_and_batches_are_the_same_however_the_split_is_sharded(sizes, block_size):
    tokens = np.arange(sum(sizes), dtype=np.uint16)
    if len(tokens) <= block_size:
        return
    one, many = TokenWindows([tokens], block_size, "train"), TokenWindows(cut(tokens, sizes), block_size, "train")
    assert many.count == one.count == len(tokens) - block_size
    numbers = np.arange(one.count)
    for a, b in zip(one.gather(numbers), many.gather(numbers)):
        assert torch.equal(a, b)
    x, y = many.gather(numbers)
    assert torch.equal(x[:, 0], torch.from_numpy(numbers)) and torch.equal(y[:, -1], x[:, -1] + 1)
    draws = [TrainBatches(w, 5, 4, 2, 0, 1) for w in (one, many)]
    for _ in range(3):
        for (x1, y1), (x2, y2) in zip(draws[0].next_step(), draws[1].next_step()):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


SHARDED_PARAMS = params(max_steps=14, eval_interval=5, log_interval=1, checkpoint_interval=4)
METRICS = ("train_loss", "val_loss", "lr", "grad_norm", "tokens")


def sharded_run(run_dir: Path, shard_tokens: int):
    """A run whose splits are cut into shards of `shard_tokens` tokens."""
    whole = np.concatenate(TRAIN)
    train = cut(whole, [shard_tokens] * (len(whole) // shard_tokens + 1))
    val = cut(VAL[0], [shard_tokens] * (len(VAL[0]) // shard_tokens + 1))
    trainer = Trainer(CONFIG, SHARDED_PARAMS, train, val, checkpoint_path=run_dir / "ckpt" / "last.pt",
                      log_dir=run_dir / "reports", tokenizer_fingerprint=TOKENIZER_FINGERPRINT)
    return trainer.run()


def test_training_over_many_shards_equals_one_shard_and_resumes_across_them(tmp_path, monkeypatch, capsys):
    one = sharded_run(tmp_path / "one", shard_tokens=10**6)
    many = sharded_run(tmp_path / "many", shard_tokens=97)  # 1 window of 17 tokens in 6 straddles two shards
    for name in METRICS:
        assert logged(tmp_path / "one", name) == logged(tmp_path / "many", name), name
    for p, q in zip(one.model.parameters(), many.model.parameters()):
        assert torch.equal(p, q)

    original = Trainer.train_step

    def crash_after_step_10(self):
        stats = original(self)
        if stats.step == 10:
            raise RuntimeError("simulated crash")
        return stats

    monkeypatch.setattr(Trainer, "train_step", crash_after_step_10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sharded_run(tmp_path / "resumed", shard_tokens=97)
    assert read_checkpoint(tmp_path / "resumed/ckpt/last.pt")["step"] == 8
    monkeypatch.undo()
    capsys.readouterr()
    resumed = sharded_run(tmp_path / "resumed", shard_tokens=97)
    assert "resuming" in capsys.readouterr().out
    for name in METRICS:
        assert logged(tmp_path / "resumed", name) == logged(tmp_path / "many", name), name
    for p, q in zip(resumed.model.parameters(), many.model.parameters()):
        assert torch.equal(p, q)


def test_evaluation_over_many_shards_equals_one_shard(tmp_path, train_stories):
    vocab, merges = train_bpe(eot_file(tmp_path / "train.txt", train_stories[:100]), 300, [EOT])
    tokenizer = Tokenizer(vocab, merges, [EOT])
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CONFIG, vocab_size=300)).eval()
    rng = np.random.default_rng(0)
    train_tokens, val_tokens = rng.integers(0, 300, 5000), rng.integers(0, 300, 700)
    results = []
    for shard_tokens in (10**6, 64):
        directory = tmp_path / str(shard_tokens)
        for split, tokens in (("train", train_tokens), ("val", val_tokens)):
            write_split(directory, split, [tokens], shard_tokens, 300, FINGERPRINT)
        val = np.concatenate(load_split(directory, "val", FINGERPRINT))  # as stages/evaluate_ppl.py reads them
        results.append(evaluate(model, val, load_split(directory, "train", FINGERPRINT), tokenizer,
                                stride=8, batch_size=4, init_seed=0))
    assert results[0] == results[1]
