"""Exact perplexity and bits per byte of a token stream, with the baselines that give them meaning.

The stream's targets are tokens[1:] (the first token has no context). They are scored in chunks:
the first chunk is the first block_size targets, then chunks of `stride` targets; each chunk is
scored in a window of block_size inputs that ends at its last target, so with stride < block_size
every target after the first block sees at least block_size - stride tokens of context. Each
target is scored exactly once; the mean NLL is over targets (token-weighted), ppl = exp(mean NLL).

Bits per byte divides the total NLL, in bits, by the UTF-8 bytes the scored targets stand for. A
special token (`<|endoftext|>`, the story boundary) counts as one byte: it is one symbol of the
text, like a newline; its 13-character spelling would flatter every model, zero bytes would leave
its NLL unpaid. Tokenizers of any vocabulary see the same stories and boundaries, so bpb compares
them where ppl (per token) cannot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinylm.tokenizer.bpe import Tokenizer
from tinylm.corpus.formats import iter_eot_stories
from tinylm.model import GPT, GPTConfig
from tinylm.errors import PipelineError
from tinylm.records.evaluation import Baselines, EvalReport, Score

COUNT_CHUNK = 1 << 24  # tokens per bincount call


@dataclass(frozen=True)
class Window:
    start: int  # inputs tokens[start:end], targets tokens[start + 1:end + 1]
    end: int
    scored: int  # only the last `scored` targets count; the earlier ones are context


def plan_windows(num_tokens: int, block_size: int, stride: int) -> list[Window]:
    """Windows whose scored parts cover the targets tokens[1:num_tokens] once each, in order."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    num_targets = num_tokens - 1
    if num_targets < 1:
        raise ValueError(f"need at least 2 tokens to score one, got {num_tokens}")
    windows = []
    done = 0
    while done < num_targets:
        end = min(num_targets, done + (block_size if done == 0 else stride))
        windows.append(Window(start=max(0, end - block_size), end=end, scored=end - done))
        done = end
    return windows


@torch.inference_mode()
def token_nll(model: GPT, tokens: np.ndarray, stride: int, batch_size: int, desc: str = "eval") -> np.ndarray:
    """NLL in nats of every target tokens[1:] given its window (float64, one entry per target).

    Every window has the same length (min(block_size, targets)), so batches stack without padding.
    Puts the model in eval mode (no dropout)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    windows = plan_windows(len(tokens), model.config.block_size, stride)
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    device = model.wte.weight.device
    nll = np.full(len(tokens) - 1, np.nan)
    with tqdm(total=len(nll), desc=desc, unit="tok", unit_scale=True, mininterval=2.0) as progress:
        for first in range(0, len(windows), batch_size):
            batch = windows[first:first + batch_size]
            inputs = torch.stack([stream[w.start:w.end] for w in batch]).to(device)
            targets = torch.stack([stream[w.start + 1:w.end + 1] for w in batch]).to(device)
            logits = model(inputs).logits
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            losses = losses.view(len(batch), -1).double().cpu().numpy()
            for window, row in zip(batch, losses):
                nll[window.end - window.scored:window.end] = row[len(row) - window.scored:]
                progress.update(window.scored)
    if np.isnan(nll).any():
        raise AssertionError("a target was left unscored: the window plan has a gap")
    return nll


def unigram_nll(train: Sequence[np.ndarray], vocab_size: int, targets: np.ndarray) -> np.ndarray:
    """NLL of each target under train-token frequencies with add-one smoothing, (count + 1) / (N + V):
    the best a model can do that ignores context (up to the smoothing)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in train:
        # In chunks: bincount widens its input to int64, 4x the uint16 shard (GBs on the GPU profile).
        for start in range(0, len(shard), COUNT_CHUNK):
            counts += np.bincount(shard[start:start + COUNT_CHUNK], minlength=vocab_size)[:vocab_size]
    log_probs = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    return -log_probs[np.asarray(targets, dtype=np.int64)]


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for; a special token counts as one byte (see the module doc)."""
    lengths = np.array([len(tokenizer.vocab[i]) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    lengths[list(tokenizer.special_tokens.values())] = 1
    return lengths


def check_spells_text(tokens: np.ndarray, tokenizer: Tokenizer, text_path: str | Path) -> int:
    """The UTF-8 bytes the stream stands for, after checking they are those of the stories in
    `text_path` (each story then one byte for its <|endoftext|>): stale shards fail here instead
    of giving a bits-per-byte over the wrong text."""
    text_path = Path(text_path)
    try:
        stories = [len(story.encode("utf-8")) for story in iter_eot_stories(text_path)]
    except OSError as exc:
        raise PipelineError(f"{text_path}: cannot read it ({exc}). Fix: run `dvc repro clean`.") from None
    expected = sum(stories) + len(stories)
    spelled = int(token_byte_lengths(tokenizer)[np.asarray(tokens)].sum())
    if spelled != expected:
        raise PipelineError(f"the val shards spell {spelled:,} bytes but the {len(stories):,} stories of {text_path} "
                            f"make {expected:,}: the shards are stale. Fix: run `dvc repro encode_shards`.")
    return spelled


def summarize(nll: np.ndarray, num_bytes: int) -> Score:
    """Mean NLL (nats/token), perplexity, and bits per byte of the scored targets."""
    total = float(nll.sum())
    loss = total / len(nll)
    return Score(loss=loss, ppl=math.exp(loss), bpb=total / math.log(2) / num_bytes)


def untrained_model(config: GPTConfig, seed: int, device: torch.device) -> GPT:
    """The weights training starts from (torch.manual_seed(train.seed), then GPT(config)), without
    touching the caller's random state. Its ppl should be about the vocabulary size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config)
    return model.to(device).eval()


def evaluate(model: GPT, val_tokens: np.ndarray, train_tokens: Sequence[np.ndarray], tokenizer: Tokenizer,
             stride: int, batch_size: int, init_seed: int) -> EvalReport:
    """The eval report: the model's val loss/ppl/bpb at the top level, the baselines beside them."""
    val_tokens = np.asarray(val_tokens)
    targets = val_tokens[1:]
    num_bytes = int(token_byte_lengths(tokenizer)[targets].sum())
    trained = summarize(token_nll(model, val_tokens, stride, batch_size, desc="trained model"), num_bytes)
    device = model.wte.weight.device
    untrained = untrained_model(model.config, init_seed, device)
    baseline = summarize(token_nll(untrained, val_tokens, stride, batch_size, desc="untrained model"), num_bytes)
    unigram = summarize(unigram_nll(train_tokens, model.config.vocab_size, targets), num_bytes)
    uniform = summarize(np.full(len(targets), math.log(model.config.vocab_size)), num_bytes)
    return EvalReport(
        val_loss=trained.loss,
        val_ppl=trained.ppl,
        val_bpb=trained.bpb,
        tokens_evaluated=len(targets),
        bytes_evaluated=num_bytes,
        block_size=model.config.block_size,
        stride=stride,
        baselines=Baselines(untrained=baseline, unigram=unigram, uniform=uniform),
    )
