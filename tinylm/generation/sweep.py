"""The decoding sweep: every strategy of `params.sample` on every prompt, and a metric row per strategy.

Sampled strategies write `num_samples` stories per prompt, with seeds seed, seed + 1, ... (the same
seeds for every strategy, so two strategies differ by their rule, not their luck). Deterministic
ones (greedy, beam, contrastive) would write the same story num_samples times, so they write it
once per prompt (seed null in samples.jsonl); the per-text metrics below compare them fairly.

Every prompt starts after <|endoftext|>, as each story does in training, so the model knows it is
at the start of a story.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tqdm import tqdm

from tinylm.tokenizer.bpe import Tokenizer
from tinylm.config import ParamError, SampleParams
from tinylm.generation.decoder import Generation
from tinylm.model import GPT
from tinylm.generation.sampling import Greedy, Sample, Strategy, decode, describe
from tinylm.generation.search import Beam, Contrastive
from tinylm.generation.text_metrics import distinct_n, repetition_rate
from tinylm.records.sampling import DecodingMetrics, GeneratedSample, SamplingReport


@dataclass(frozen=True)
class SweepConfig:
    name: str  # a key of reports/sampling.json
    strategy: Strategy


def _number(value: float) -> str:
    # No dots in metric names: DVC joins nested keys with dots.
    return f"{value:g}".replace(".", "p")


def sweep_configs(params: SampleParams) -> list[SweepConfig]:
    """Greedy; pure sampling at each temperature; top-k, top-p at temperature 1; min-p; beam; contrastive."""
    for key in ("temperatures", "top_k", "top_p"):
        values = getattr(params, key)
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ParamError(f"sample.{key}: lists {repeated} more than once; each value names one config")
    return [
        SweepConfig("greedy", Greedy()),
        *(SweepConfig(f"temperature_{_number(t)}", Sample(temperature=t)) for t in params.temperatures),
        *(SweepConfig(f"top_k_{k}", Sample(top_k=k)) for k in params.top_k),
        *(SweepConfig(f"top_p_{_number(p)}", Sample(top_p=p)) for p in params.top_p),
        SweepConfig(f"min_p_{_number(params.min_p)}", Sample(min_p=params.min_p)),
        SweepConfig(f"beam_{params.beam_width}", Beam(params.beam_width, params.length_penalty)),
        SweepConfig(f"contrastive_k{params.contrastive_k}_a{_number(params.contrastive_alpha)}",
                    Contrastive(params.contrastive_k, params.contrastive_alpha)),
    ]


def summarize(generations: list[Generation], texts: list[str]) -> DecodingMetrics:
    """Metrics of one config's generations (texts: their decoded tokens, without the prompt).

    entropy: the model's next-token entropy (nats) along the generated text, at temperature 1;
    sampling_entropy: that of the distributions the tokens were drawn from (0 when deterministic);
    self_ppl: the model's perplexity of its own tokens, <|endoftext|> included when it stopped;
    mean_length: new tokens per sample; eot_rate: share of samples that ended the story."""
    steps = sum(len(g.logprobs) for g in generations)
    return DecodingMetrics(
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        distinct_3=distinct_n(texts, 3),
        repetition_4=repetition_rate(texts, 4),
        entropy=sum(sum(g.entropies) for g in generations) / steps,
        sampling_entropy=sum(sum(g.sampling_entropies) for g in generations) / steps,
        self_ppl=math.exp(sum(g.nll for g in generations) / steps),
        mean_length=sum(len(g.tokens) for g in generations) / len(generations),
        eot_rate=sum(g.stopped_at_eot for g in generations) / len(generations),
        num_samples=len(generations),
    )


def run_sweep(model: GPT, tokenizer: Tokenizer,
              params: SampleParams) -> tuple[list[GeneratedSample], SamplingReport]:
    """(one record per sample for samples.jsonl, {config name: metrics} for sampling.json)."""
    configs = sweep_configs(params)
    seeds = [params.seed + i for i in range(params.num_samples)]
    prompts = [(prompt, [tokenizer.eot_id, *tokenizer.encode(prompt)]) for prompt in params.prompts]
    records: list[GeneratedSample] = []
    metrics: SamplingReport = {}
    for config in tqdm(configs, desc="sample sweep", unit="config"):
        started = time.perf_counter()
        generations: list[Generation] = []
        texts: list[str] = []
        for prompt, prompt_ids in prompts:
            outputs = decode(model, prompt_ids, config.strategy, params.max_new_tokens, tokenizer.eot_id, seeds)
            sample_seeds = [None] if config.strategy.deterministic else seeds
            for seed, generation in zip(sample_seeds, outputs):
                text = tokenizer.decode(generation.tokens)
                generations.append(generation)
                texts.append(text)
                records.append(GeneratedSample(
                    config=config.name,
                    params=describe(config.strategy),
                    prompt=prompt,
                    seed=seed,
                    completion=text,
                    num_tokens=len(generation.tokens),
                    stopped_at_eot=generation.stopped_at_eot,
                    self_ppl=math.exp(generation.nll / len(generation.logprobs)),
                ))
        metrics[config.name] = summarize(generations, texts)
        new_tokens = sum(len(g.logprobs) for g in generations)
        tqdm.write(f"{config.name}: {len(generations)} samples, {new_tokens / (time.perf_counter() - started):,.0f} "
                   f"tok/s, self ppl {metrics[config.name].self_ppl:.2f}, "
                   f"distinct-2 {metrics[config.name].distinct_2:.3f}")
    return records, metrics
