"""What the model sees in a text, for the playground and for logprobs: each token's loss and the
tokens the model expected instead, and the attention of one head.

The losses are `tinylm score`'s own (`tinylm.cli.score.score` for a text, its
`tinylm.evaluate.token_nll` for a completion's ids): the same windows, the same numbers. The
alternatives come from one forward per window of the same plan (`tinylm.evaluate.plan_windows`
at score's stride), so every token's alternatives were predicted from the context its loss was.
Attention is the report's (`tinylm.report.introspection.attention_probabilities`), on a copy of
the model that only it uses: its forward hooks would also catch the forwards that other requests
run on the shared model at the same time.
"""
from __future__ import annotations

import copy
import threading

import numpy as np
import torch

from tinylm.cli.models import Loaded
from tinylm.cli.score import BATCH_SIZE, score
from tinylm.evaluate import plan_windows, token_nll
from tinylm.model import GPT
from tinylm.report.introspection import attention_probabilities
from tinylm.serve.schemas import APIError


def piece(loaded: Loaded, token: int) -> str:
    """A token's text; bytes of a character it holds only part of become U+FFFD."""
    return loaded.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


def stride_of(loaded: Loaded) -> int:
    return max(1, loaded.model.config.block_size // 2)  # score's default stride


@torch.inference_mode()
def alternatives(loaded: Loaded, tokens: list[int], top: int) -> list[list[tuple[int, float]]]:
    """For every target tokens[1:], the `top` most likely tokens there and their log-probabilities."""
    model, stream = loaded.model, torch.tensor(tokens)
    device = model.wte.weight.device
    rows: list[list[tuple[int, float]]] = []
    for window in plan_windows(len(tokens), model.config.block_size, stride_of(loaded)):
        logits = model(stream[None, window.start:window.end].to(device)).logits[0, -window.scored:]
        values, index = logits.float().log_softmax(dim=-1).topk(top, dim=-1)
        rows += [list(zip(ids, logprobs)) for ids, logprobs in zip(index.tolist(), values.tolist())]
    return rows


def token_losses(loaded: Loaded, tokens: list[int]) -> np.ndarray:
    """NLL (nats) of every target tokens[1:], as `tinylm score` computes it."""
    loaded.model.eval()
    return token_nll(loaded.model, np.array(tokens), stride_of(loaded), BATCH_SIZE, desc="score")


def score_view(loaded: Loaded, text: str, top: int) -> dict:
    """The text's tokens with their loss and alternatives, and its loss, perplexity and bits per byte."""
    scored = score(loaded, text, stride=None)
    expected = alternatives(loaded, scored.tokens, top) if top else [[] for _ in scored.nll]
    tokens = [{"id": token, "text": piece(loaded, token), "nll": float(nll),
               "alternatives": [{"id": i, "text": piece(loaded, i), "logprob": lp} for i, lp in options]}
              for token, nll, options in zip(scored.tokens[1:], scored.nll, expected)]
    summary = scored.score
    return {"tokens": tokens, "num_tokens": len(tokens), "loss": summary.loss, "ppl": summary.ppl,
            "bpb": summary.bpb}


class AttentionProbe:
    """A private copy of a served model for attention_probabilities, one request at a time."""

    def __init__(self, loaded: Loaded):
        self.loaded = loaded
        self.model = copy.deepcopy(loaded.model)
        self.lock = threading.Lock()

    def view(self, text: str, layer: int, head: int) -> dict:
        with self.lock:
            return attention_view(self.loaded, self.model, text, layer, head)


def attention_view(loaded: Loaded, model: GPT, text: str, layer: int, head: int) -> dict:
    """One head's attention over <|endoftext|> and the text's first tokens (as many as the model sees)."""
    config = model.config
    for name, value, count in (("layer", layer, config.n_layer), ("head", head, config.n_head)):
        if value >= count:
            raise APIError(400, f"{name} {value} does not exist: the model has {count} (0..{count - 1})", param=name)
    tokens = [loaded.tokenizer.eot_id, *loaded.tokenizer.encode(text)]
    shown = tokens[:config.block_size]
    probs = attention_probabilities(model, torch.tensor(shown))[layer, head]
    return {"tokens": [piece(loaded, token) for token in shown], "truncated": len(tokens) > len(shown),
            "layer": layer, "head": head,
            # Row i: how query i spreads its attention over keys 0..i (the causal mask zeroes the rest).
            "weights": [[round(p, 5) for p in probs[i, :i + 1].tolist()] for i in range(len(shown))]}
