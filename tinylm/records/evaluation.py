"""The evaluate_ppl stage's record, reports/eval.json: exact val perplexity beside its baselines."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Score:
    loss: float  # mean NLL, nats per token
    ppl: float
    bpb: float  # bits per UTF-8 byte of the text


@dataclass(frozen=True)
class Baselines:
    untrained: Score  # the same model at its seeded initialisation
    unigram: Score  # train token frequencies, no context
    uniform: Score  # every token of the vocabulary equally likely


@dataclass(frozen=True)
class EvalReport:
    """reports/eval.json (DVC metrics): the trained model's score at the top level."""

    val_loss: float
    val_ppl: float
    val_bpb: float
    tokens_evaluated: int
    bytes_evaluated: int
    block_size: int
    stride: int
    baselines: Baselines
