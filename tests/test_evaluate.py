"""Exact perplexity: the window plan, the batched NLL against one forward per target, bits per
byte, the baselines, and loading a model that belongs to the tokenizer."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tinylm.tokenizer.bpe import Tokenizer
from tinylm.corpus.formats import write_eot_stories
from tinylm.evaluate import (check_spells_text, plan_windows, summarize, token_byte_lengths, token_nll, unigram_nll, untrained_model)
from tinylm.model import load_trained_model
from tinylm.files import write_json
from tinylm.model import GPT, GPTConfig, save_trained_model
from tinylm.errors import PipelineError
from tinylm.records.io import write_record
from tinylm.records.model import TrainingSummary

BLOCK = 8
CONFIG = GPTConfig(vocab_size=37, block_size=BLOCK, n_layer=2, n_head=2, d_model=16)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    gpt = GPT(CONFIG).eval()
    with torch.no_grad():  # peaked predictions, so a wrong context changes the NLL visibly
        for weight in gpt.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.3)
    return gpt


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=n).astype(np.uint16)


@pytest.mark.parametrize("stride", [1, 3, 5, BLOCK])
@pytest.mark.parametrize("num_tokens", [2, 5, BLOCK, BLOCK + 1, BLOCK + 2, 17, 30, 64])
def test_every_target_is_scored_exactly_once(num_tokens, stride):
    windows = plan_windows(num_tokens, BLOCK, stride)
    counts = np.zeros(num_tokens - 1, dtype=int)
    for w in windows:
        assert w.end - w.start == min(BLOCK, num_tokens - 1)  # one length: batches stack without padding
        assert 1 <= w.scored <= w.end - w.start
        assert w.end <= num_tokens - 1  # targets tokens[start+1:end+1] exist
        counts[w.end - w.scored:w.end] += 1
        if w.end > BLOCK:  # past the first block, every scored target keeps block - stride of context
            assert w.end - w.scored - w.start >= BLOCK - stride
    assert (counts == 1).all()
    ends = [w.end for w in windows]
    assert ends == sorted(ends) and ends[-1] == num_tokens - 1


def test_non_overlapping_windows_when_stride_is_the_block():
    windows = plan_windows(3 * BLOCK + 4, BLOCK, BLOCK)
    assert [(w.start, w.end, w.scored) for w in windows] == [
        (0, 8, 8), (8, 16, 8), (16, 24, 8), (19, 27, 3)]  # the short tail keeps a full window of context


@pytest.mark.parametrize("args, message", [((10, BLOCK, 0), "stride must be in"), ((10, BLOCK, BLOCK + 1), "stride"),
                                           ((1, BLOCK, 4), "at least 2 tokens")])
def test_bad_window_requests(args, message):
    with pytest.raises(ValueError, match=message):
        plan_windows(*args)


def brute_force_nll(model: GPT, tokens: np.ndarray, stride: int) -> np.ndarray:
    """One forward per target over exactly its context: the window start that the chunking rule
    gives (first block_size targets, then chunks of stride, each window ending at its chunk's end)."""
    num_targets = len(tokens) - 1
    out = []
    with torch.no_grad():
        for j in range(num_targets):
            if j < BLOCK:
                chunk_end = min(BLOCK, num_targets)
            else:
                chunk_end = min(num_targets, BLOCK + math.ceil((j + 1 - BLOCK) / stride) * stride)
            start = max(0, chunk_end - BLOCK)
            context = torch.tensor(tokens[start:j + 1].astype(np.int64))[None]
            logp = model(context).logits[0, -1].log_softmax(-1)
            out.append(-float(logp[int(tokens[j + 1])]))
    return np.array(out)


@pytest.mark.parametrize("stride", [1, 3, BLOCK])
@pytest.mark.parametrize("num_tokens", [6, 29])
def test_batched_nll_equals_one_forward_per_target(model, num_tokens, stride):
    tokens = random_tokens(num_tokens, seed=num_tokens)
    expected = brute_force_nll(model, tokens, stride)
    for batch_size in (1, 4):
        np.testing.assert_allclose(token_nll(model, tokens, stride, batch_size), expected, rtol=1e-4, atol=1e-5)


def test_context_matters_so_the_check_above_has_teeth(model):
    tokens = random_tokens(29, seed=1)
    assert not np.allclose(brute_force_nll(model, tokens, 1), brute_force_nll(model, tokens, BLOCK), atol=1e-3)


def test_non_overlapping_mean_equals_the_model_loss(model):
    tokens = random_tokens(4 * BLOCK + 1, seed=2)
    nll = token_nll(model, tokens, BLOCK, batch_size=3)
    x = torch.tensor(tokens[:-1].astype(np.int64)).view(4, BLOCK)
    y = torch.tensor(tokens[1:].astype(np.int64)).view(4, BLOCK)
    with torch.no_grad():
        assert nll.mean() == pytest.approx(float(model(x, y).loss), rel=1e-5)


def test_summary_formulas():
    nll = np.full(10, math.log(2))  # one bit per token
    result = summarize(nll, num_bytes=20)
    assert result.loss == pytest.approx(math.log(2))
    assert result.ppl == pytest.approx(2.0)
    assert result.bpb == pytest.approx(0.5)  # 10 bits over 20 bytes
    uneven = summarize(np.array([1.0, 2.0, 6.0]), num_bytes=4)
    assert uneven.ppl == pytest.approx(math.exp(3.0))
    assert uneven.bpb == pytest.approx(9.0 / math.log(2) / 4)


def test_unigram_baseline_on_a_known_distribution():
    train = [np.array([0, 0, 0], dtype=np.uint16), np.array([1], dtype=np.uint16)]  # counts 3, 1, 0 of V=3
    nll = unigram_nll(train, vocab_size=3, targets=np.array([0, 1, 2, 0]))
    np.testing.assert_allclose(np.exp(-nll), [4 / 7, 2 / 7, 1 / 7, 4 / 7])  # (count + 1) / (4 + 3)
    assert np.exp(-unigram_nll(train, 3, np.arange(3))).sum() == pytest.approx(1.0)


def test_untrained_model_is_the_seeded_init_and_leaves_the_rng_alone():
    state = torch.random.get_rng_state()
    baseline = untrained_model(CONFIG, seed=1337, device=torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(1337)
    reference = GPT(CONFIG)
    for (name, a), (_, b) in zip(baseline.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert not baseline.training


@pytest.fixture()
def tokenizer() -> Tokenizer:
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab", 257: "é".encode()}
    return Tokenizer(vocab, [(b"a", b"b"), (b"\xc3", b"\xa9")], ["<|endoftext|>"])


def test_byte_lengths_count_special_tokens_as_one_byte(tokenizer):
    lengths = token_byte_lengths(tokenizer)
    assert lengths[ord("a")] == 1 and lengths[256] == 2 and lengths[257] == 2
    assert lengths[tokenizer.eot_id] == 1


def test_the_stream_must_spell_the_clean_text(tokenizer, tmp_path):
    stories = ["abc é", "ab ab"]
    path = tmp_path / "val.txt"
    write_eot_stories(path, stories)
    tokens = np.array([i for s in stories for i in [*tokenizer.encode(s), tokenizer.eot_id]])
    assert check_spells_text(tokens, tokenizer, path) == len("abc é".encode()) + len("ab ab") + 2
    with pytest.raises(PipelineError, match="stale.*encode_shards"):
        check_spells_text(tokens[:-2], tokenizer, path)


def test_load_trained_model_checks_the_tokenizer(tokenizer, tmp_path):
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=1, d_model=8))
    summary = save_trained_model(model, tmp_path, TrainingSummary(
        config=dataclasses.asdict(model.config), params=model.num_params(),
        params_without_embeddings=model.num_params(include_embeddings=False), steps=1, tokens_trained=8,
        final_train_loss=5.0, final_val_loss=5.5, tokenizer_fingerprint=tokenizer.fingerprint))
    loaded = load_trained_model(tmp_path, tokenizer.fingerprint, torch.device("cpu"))
    assert torch.equal(loaded.wte.weight, model.wte.weight) and not loaded.training
    write_record(tmp_path / "model.json", dataclasses.replace(summary, tokenizer_fingerprint="0" * 64))
    with pytest.raises(PipelineError, match="trained with tokenizer 0000.*, but data/tokenizer is tokenizer "
                                            f"{tokenizer.fingerprint[:16]}.*dvc repro pretrain"):
        load_trained_model(tmp_path, tokenizer.fingerprint, torch.device("cpu"))
    with pytest.raises(PipelineError, match="trained with tokenizer 0000.*, but /elsewhere/tok is tokenizer"):
        load_trained_model(tmp_path, tokenizer.fingerprint, torch.device("cpu"), tokenizer_dir="/elsewhere/tok")
    write_json(tmp_path / "model.json", {"tokenizer_fingerprint": tokenizer.fingerprint})
    with pytest.raises(PipelineError, match="model.json: has no key 'config'.*dvc repro pretrain"):
        load_trained_model(tmp_path, tokenizer.fingerprint, torch.device("cpu"))
    write_record(tmp_path / "model.json", summary)
    (tmp_path / "model.pt").unlink()
    with pytest.raises(PipelineError, match=r"model.pt: cannot be read \(No such file or directory\).*dvc checkout "
                                            "data/model.*dvc repro pretrain"):
        load_trained_model(tmp_path, tokenizer.fingerprint, torch.device("cpu"))
    with pytest.raises(PipelineError, match="missing/model.json: missing.*dvc repro pretrain"):
        load_trained_model(tmp_path / "missing", tokenizer.fingerprint, torch.device("cpu"))
