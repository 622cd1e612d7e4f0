"""The sample_sweep stage's records: reports/sampling.json and the lines of reports/samples.jsonl."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodingMetrics:
    """One decoding config over all prompts and seeds (see tinylm.generation.sweep.summarize)."""

    distinct_1: float
    distinct_2: float
    distinct_3: float
    repetition_4: float
    entropy: float
    sampling_entropy: float
    self_ppl: float
    mean_length: float
    eot_rate: float
    num_samples: int


# reports/sampling.json: config name -> its metrics.
SamplingReport = dict[str, DecodingMetrics]


@dataclass(frozen=True)
class GeneratedSample:
    """One line of reports/samples.jsonl."""

    config: str  # a key of sampling.json
    params: dict[str, str | int | float | None]  # the strategy as data: its name under "strategy", then its fields
    prompt: str
    seed: int | None  # None for a deterministic strategy, which writes one sample per prompt
    completion: str
    num_tokens: int
    stopped_at_eot: bool
    self_ppl: float
