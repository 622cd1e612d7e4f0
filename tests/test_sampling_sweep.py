"""The sweep: configs from params, the text metrics, and the per-config summary."""
from __future__ import annotations

import dataclasses
import math

import pytest

from tinylm.config import ParamError, load_params
from tinylm.generation.decoder import Generation
from tinylm.generation.sampling import Greedy, Sample
from tinylm.generation.search import Beam, Contrastive
from tinylm.generation.sweep import summarize, sweep_configs
from tinylm.generation.text_metrics import distinct_n, ngram_counts, repetition_rate, words


@pytest.fixture(scope="module")
def sample_params(repo_root):
    return load_params(repo_root / "params.yaml").sample


def test_configs_cover_every_listed_value_once(sample_params):
    configs = sweep_configs(sample_params)
    names = [c.name for c in configs]
    assert len(set(names)) == len(names)
    assert all("." not in name for name in names)  # DVC joins nested metric keys with dots
    strategies = [c.strategy for c in configs]
    assert strategies.count(Greedy()) == 1
    assert {s.temperature for s in strategies if isinstance(s, Sample) and s == Sample(temperature=s.temperature)} \
        == set(sample_params.temperatures)
    assert {s.top_k for s in strategies if isinstance(s, Sample) and s.top_k} == set(sample_params.top_k)
    assert {s.top_p for s in strategies if isinstance(s, Sample) and s.top_p} == set(sample_params.top_p)
    assert Sample(min_p=sample_params.min_p) in strategies
    assert Beam(sample_params.beam_width, sample_params.length_penalty) in strategies
    assert Contrastive(sample_params.contrastive_k, sample_params.contrastive_alpha) in strategies
    assert len(configs) == 4 + len(sample_params.temperatures) + len(sample_params.top_k) + len(sample_params.top_p)


def test_config_names_are_readable(sample_params):
    params = dataclasses.replace(sample_params, temperatures=[0.5, 1.0], top_p=[0.95], min_p=0.05,
                                 contrastive_k=4, contrastive_alpha=0.6)
    names = [c.name for c in sweep_configs(params)]
    for expected in ("greedy", "temperature_0p5", "temperature_1", "top_p_0p95", "min_p_0p05", "contrastive_k4_a0p6"):
        assert expected in names


def test_a_value_listed_twice_is_a_param_error(sample_params):
    params = dataclasses.replace(sample_params, top_k=[10, 50, 10])
    with pytest.raises(ParamError, match=r"sample.top_k: lists \[10\] more than once"):
        sweep_configs(params)


def test_words_split_punctuation():
    assert words("Tom said, \"Hi!\" It's") == ["Tom", "said", ",", '"', "Hi", "!", '"', "It", "'", "s"]


def test_distinct_and_repetition_on_known_texts():
    assert ngram_counts(["a", "b", "a", "b"], 2) == (2, 3)  # ab, ba, ab
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    # Pooled per text: the same sentence in two texts is not a repetition.
    assert distinct_n(["a b c", "a b c"], 1) == 1.0
    assert repetition_rate(["a b c d a b c d"], 4) == pytest.approx(1 / 5)  # abcd repeats once among 5
    assert repetition_rate(["the cat sat on the mat"], 4) == 0.0
    assert distinct_n(["short"], 2) == 0.0 and repetition_rate(["too short"], 4) == 0.0
    # Short texts weigh by their n-gram count: (3 unique of 3) + (1 unique of 3).
    assert distinct_n(["a b c d", "x x x x"], 2) == pytest.approx(4 / 6)


def test_summary_weights_tokens_and_samples():
    stopped = Generation([5, 6], True, logprobs=[-1.0, -2.0, -3.0], entropies=[1.0, 1.0, 4.0],
                         sampling_entropies=[0.5, 0.5, 0.5])
    running = Generation([7], False, logprobs=[-2.0], entropies=[2.0], sampling_entropies=[0.5])
    metrics = summarize([stopped, running], ["one two", "three"])
    assert metrics.self_ppl == pytest.approx(math.exp(8.0 / 4))  # per produced token, EOT included
    assert metrics.entropy == pytest.approx(8.0 / 4)
    assert metrics.sampling_entropy == pytest.approx(0.5)
    assert metrics.mean_length == pytest.approx(1.5)
    assert metrics.eot_rate == pytest.approx(0.5)
    assert metrics.num_samples == 2
    assert metrics.distinct_1 == 1.0
