"""The pretrain stage's milestone stories: the lines of reports/train/samples.jsonl."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MilestoneSample:
    """One continuation of one prompt, decoded from the model after `step` updates."""

    step: int
    prompt: str
    strategy: str  # "greedy", or "min_p_0.05": one sample at temperature 1 from the min-p-truncated distribution
    seed: int | None  # the sample's generator seed (train.seed); None for greedy, which draws nothing
    text: str  # the continuation, without the prompt and without a final <|endoftext|>
    tokens: int  # new tokens in `text`
    stopped_at_eot: bool  # the model ended the story before train.sample_tokens
    # The model's own mean log-probability (nats, temperature 1, unfiltered) of the tokens it produced,
    # <|endoftext|> included when it stopped: how likely it finds its own story.
    mean_logprob: float
