"""Decoding strategies: stateless functions on next-token logits, and the sampling loop.

The logit functions take logits [B, V] and return new logits [B, V] with the excluded tokens set
to -inf, so they compose (temperature first, then the truncations, as in Hugging Face's order).
`generate` runs greedy decoding or sampling on the model through a `Decoder` (KV cache, window
sliding past block_size); beam and contrastive search live in `tinylm.generation.search`; `decode` picks the
function for a strategy. `on_step`, when given, receives each step's new token ids [B] as they are
chosen (the `tinylm generate` console command streams them); beam search has no such per-step tokens.

What a generation records, beyond its tokens: the model's own log-probability of each produced
token and the entropy of its next-token distribution (both at temperature 1, unfiltered: what the
model believes, whatever the strategy did), and the entropy of the distribution the token was
actually drawn from (0 for deterministic strategies).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch

from tinylm.generation.decoder import (Decoder, Generation, check_length, check_prompt, entropy, rows_to_generations)
from tinylm.model import GPT
from tinylm.generation.search import Beam, Contrastive, beam_search, contrastive_search


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature} (use greedy decoding for 0)")


def check_top_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")


def check_top_p(p: float) -> None:
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")


def check_min_p(min_p: float) -> None:
    if not 0 < min_p <= 1:
        raise ValueError(f"min_p must be in (0, 1], got {min_p}")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    check_temperature(temperature)
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k highest logits per row (ties broken by index, like argmax)."""
    check_top_k(k)
    if k >= logits.shape[-1]:
        return logits
    values, index = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability mass reaches p."""
    check_top_p(p)
    if p == 1:
        # The whole distribution; the cumulative sum below could round to 1 early and drop the tail.
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token stays if the mass strictly before it is < p; the most likely token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024): keep tokens with p >= min_p * p_max, a cut that scales with confidence."""
    check_min_p(min_p)
    probs = logits.softmax(dim=-1)
    keep = probs >= min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(~keep, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Strategies: typed, validated at construction so a bad param fails before any generation.


@dataclass(frozen=True)
class Greedy:
    deterministic: ClassVar[bool] = True


@dataclass(frozen=True)
class Sample:
    """Multinomial sampling at `temperature`, optionally truncated by top-k, top-p and min-p."""

    deterministic: ClassVar[bool] = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        for value, check in ((self.top_k, check_top_k), (self.top_p, check_top_p), (self.min_p, check_min_p)):
            if value is not None:
                check(value)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        logits = apply_temperature(logits, self.temperature)
        if self.top_k is not None:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p is not None:
            logits = top_p_filter(logits, self.top_p)
        if self.min_p is not None:
            logits = min_p_filter(logits, self.min_p)
        return logits


Strategy = Greedy | Sample | Beam | Contrastive


def describe(strategy: Strategy) -> dict:
    """The strategy as plain data, for samples.jsonl."""
    return {"strategy": type(strategy).__name__.lower(), **dataclasses.asdict(strategy)}


@torch.inference_mode()
def generate(model: GPT, prompt: Sequence[int], strategy: Greedy | Sample, max_new_tokens: int,
             eot_id: int | None, seeds: Sequence[int] = (0,), use_cache: bool = True,
             on_step: Callable[[torch.Tensor], None] | None = None) -> list[Generation]:
    """One generation per seed, all in one batch; each row draws from its own seeded generator, so a
    sample depends on its seed only (greedy ignores the seeds). Stops at `eot_id` (None: never) or
    after max_new_tokens. on_step(tokens [B]) sees every step's tokens, a finished row's included."""
    check_length(max_new_tokens)
    if len(seeds) == 0:
        raise ValueError("give at least one seed")
    ids = check_prompt(model, prompt)
    device = ids.device
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    decoder = Decoder(model, use_cache=use_cache)
    logits = decoder.start(ids, batch_size=len(seeds)).logits
    finished = torch.zeros(len(seeds), dtype=torch.bool, device=device)
    steps: list[tuple[torch.Tensor, ...]] = []
    for step in range(max_new_tokens):
        logprobs = logits.log_softmax(dim=-1)
        if isinstance(strategy, Greedy):
            token = logits.argmax(dim=-1)
            sampling_entropy = torch.zeros_like(finished, dtype=logits.dtype)
        else:
            processed = strategy.process(logits)
            probs = processed.softmax(dim=-1)
            token = torch.cat([torch.multinomial(probs[row], 1, generator=generator)
                               for row, generator in enumerate(generators)])
            sampling_entropy = torch.special.entr(probs).sum(dim=-1)
        steps.append((token, logprobs.gather(1, token[:, None])[:, 0], entropy(logits), sampling_entropy))
        if on_step is not None:
            on_step(token)
        if eot_id is not None:
            finished |= token == eot_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = decoder.step(token).logits
    tokens, token_logprobs, entropies, sampling_entropies = (torch.stack(column, dim=1) for column in zip(*steps))
    return rows_to_generations(tokens, token_logprobs, entropies, sampling_entropies, eot_id)


def decode(model: GPT, prompt: Sequence[int], strategy: Strategy, max_new_tokens: int, eot_id: int | None,
           seeds: Sequence[int] = (0,), use_cache: bool = True,
           on_step: Callable[[torch.Tensor], None] | None = None) -> list[Generation]:
    """Generations for `strategy`: one per seed when it samples, a single one when it is deterministic.
    on_step: see `generate`; beam search keeps changing its hypotheses until the end, so it refuses one."""
    if isinstance(strategy, Sample):
        return generate(model, prompt, strategy, max_new_tokens, eot_id, seeds, use_cache, on_step)
    if isinstance(strategy, Greedy):
        return generate(model, prompt, strategy, max_new_tokens, eot_id, (0,), use_cache, on_step)
    if isinstance(strategy, Beam):
        if on_step is not None:
            raise ValueError("beam search cannot report tokens per step: its hypotheses change until the end")
        return [beam_search(model, prompt, strategy, max_new_tokens, eot_id, use_cache)]
    if isinstance(strategy, Contrastive):
        return [contrastive_search(model, prompt, strategy, max_new_tokens, eot_id, use_cache, on_step)]
    raise TypeError(f"unknown decoding strategy {strategy!r}")
