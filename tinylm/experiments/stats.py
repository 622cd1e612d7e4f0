"""The statistics behind `tinylm compare`: how much runs of one config vary, and whether two configs differ.

Seed noise: runs that differ only in train.seed are samples of one distribution; a group's mean comes
with a t-based 95% confidence interval. Two groups are compared with Welch's t-test (no equal-variance
assumption: a recipe can be noisier than another), which gives the difference of the means, its CI and
a p-value; the verdict in words reads both. Evaluation noise alone: two fixed models scored on the same
stories, the difference of their bits per byte with a paired bootstrap CI over stories (silent about
seed noise: a second seed may land anywhere in the seed spread). scipy.stats supplies the distributions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


@dataclass(frozen=True)
class Spread:
    """A group's values: n, mean, sample standard deviation and the t-based CI of the mean (nan for n = 1)."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with its CI and the two-sided p-value; `verdict` says what it means for a."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    df: float
    verdict: str


def spread(values: Sequence[float]) -> Spread:
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if len(x) == 1:
        return Spread(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = stats.t.ppf(1 - ALPHA / 2, len(x) - 1) * sd / math.sqrt(len(x))
    return Spread(len(x), mean, sd, float(mean - half), float(mean + half))


def verdict(diff: float, p_value: float, lower_is_better: bool) -> str:
    """In words, for the first group against the second, at the 5% level."""
    if not p_value < ALPHA:
        return "no detectable difference at 5%"
    return "better" if (diff < 0) == lower_is_better else "worse"


def welch(a: Sequence[float], b: Sequence[float], lower_is_better: bool = True) -> Difference:
    """Welch's two-sample t-test of mean(a) - mean(b); both sides need n >= 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs two runs on each side, got {len(a)} and {len(b)}")
    diff = float(a.mean() - b.mean())
    if a.std(ddof=1) == 0 and b.std(ddof=1) == 0:
        # Bit-identical reruns on both sides: no noise to test against, the difference is exact.
        p_value = 1.0 if diff == 0 else 0.0
        return Difference(diff, diff, diff, p_value, math.inf, verdict(diff, p_value, lower_is_better))
    result = stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(CONFIDENCE)
    p_value = float(result.pvalue)
    return Difference(diff, float(interval.low), float(interval.high), p_value, float(result.df),
                      verdict(diff, p_value, lower_is_better))


@dataclass(frozen=True)
class PairedDifference:
    """bpb(a) - bpb(b) on the same stories, with a paired bootstrap CI over stories."""

    bpb_a: float
    bpb_b: float
    diff: float
    ci_low: float
    ci_high: float
    stories: int
    resamples: int


def paired_bootstrap_bpb(nll_a: Sequence[float], nll_b: Sequence[float], num_bytes: Sequence[float],
                         resamples: int = 10_000, seed: int = 0, confidence: float = CONFIDENCE) -> PairedDifference:
    """Story i has total NLL nll_a[i] and nll_b[i] (nats) under the two models and num_bytes[i] UTF-8 bytes.
    The statistic is the corpus bpb difference, sum(nll_a - nll_b) / (ln 2 sum(bytes)), a ratio: resampling
    whole stories keeps each story's two scores and its length together (the pairing), and BCa corrects
    the ratio's small bias and skew."""
    nll_a, nll_b, num_bytes = (np.asarray(v, dtype=np.float64) for v in (nll_a, nll_b, num_bytes))
    if not len(nll_a) == len(nll_b) == len(num_bytes) >= 2:
        raise ValueError("need the same two or more stories scored by both models")

    def bpb_difference(a: np.ndarray, b: np.ndarray, size: np.ndarray, axis: int = -1) -> np.ndarray:
        return (a - b).sum(axis=axis) / (math.log(2) * size.sum(axis=axis))

    result = stats.bootstrap((nll_a, nll_b, num_bytes), bpb_difference, paired=True, vectorized=True,
                             n_resamples=resamples, confidence_level=confidence, method="BCa",
                             rng=np.random.default_rng(seed))
    total = math.log(2) * num_bytes.sum()
    return PairedDifference(bpb_a=float(nll_a.sum() / total), bpb_b=float(nll_b.sum() / total),
                            diff=float(bpb_difference(nll_a, nll_b, num_bytes)),
                            ci_low=float(result.confidence_interval.low), ci_high=float(result.confidence_interval.high),
                            stories=len(nll_a), resamples=resamples)
