"""Decoding strategies: the logit filters, and generation on the KV cache against references
without it (greedy, brute-force beam and contrastive steps, full-forward rescoring)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinylm.model import GPT, GPTConfig
from tinylm.generation.sampling import (Greedy, Sample, apply_temperature, decode, generate, min_p_filter, top_k_filter, top_p_filter)
from tinylm.generation.decoder import entropy
from tinylm.generation.search import Beam, Contrastive, beam_search, contrastive_search

VOCAB, BLOCK = 61, 24
PROMPT = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def model() -> GPT:
    """A random GPT whose next-token distributions are peaked and vary with the context (GPT-2's
    0.02 init would give near-uniform ones that make every strategy look alike)."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, d_model=32)).eval()
    with torch.no_grad():
        for weight in gpt.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.3)
    return gpt


def random_logits(seed: int, rows: int = 4, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# --------------------------------------------------------------------------------- logit filters


@pytest.mark.parametrize("seed", range(5))
def test_top_k_keeps_exactly_the_k_highest(seed):
    logits = random_logits(seed)
    for k in (1, 7, 50, 80):
        kept = top_k_filter(logits, k).isfinite()
        assert (kept.sum(dim=-1) == min(k, 50)).all()
        lowest_kept = logits.masked_fill(~kept, math.inf).amin(dim=-1)
        highest_dropped = logits.masked_fill(kept, -math.inf).amax(dim=-1)
        assert (lowest_kept > highest_dropped).all()
        torch.testing.assert_close(top_k_filter(logits, k)[kept], logits[kept])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_nucleus_reaching_p(seed, p):
    logits = random_logits(seed)
    probs = logits.softmax(dim=-1)
    kept = top_p_filter(logits, p).isfinite()
    for row in range(logits.shape[0]):
        mass = probs[row][kept[row]].sum()
        smallest_kept = probs[row][kept[row]].min()
        assert mass >= p - 1e-6  # the nucleus reaches p...
        assert mass - smallest_kept < p  # ...and would not without its least likely token
        dropped = probs[row][~kept[row]]
        assert dropped.numel() == 0 or dropped.max() <= smallest_kept  # a set of the most likely tokens


def test_top_p_one_keeps_everything():
    logits = random_logits(0)
    assert torch.equal(top_p_filter(logits, 1.0), logits)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_keeps_exactly_tokens_above_the_scaled_maximum(seed, min_p):
    logits = random_logits(seed)
    probs = logits.softmax(dim=-1)
    expected = probs >= min_p * probs.max(dim=-1, keepdim=True).values
    assert torch.equal(min_p_filter(logits, min_p).isfinite(), expected)
    assert expected.any(dim=-1).all()


def test_min_p_on_a_known_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    kept = min_p_filter(probs.log(), 0.1).isfinite()  # threshold 0.05
    assert kept.tolist() == [[True, True, True, True, False]]


def test_higher_temperature_gives_higher_entropy():
    logits = random_logits(1)
    entropies = [entropy(apply_temperature(logits, t)) for t in (0.3, 0.7, 1.0, 1.5, 3.0)]
    for colder, hotter in zip(entropies, entropies[1:]):
        assert (hotter > colder).all()


def test_higher_temperature_gives_higher_entropy_along_generations(model):
    seeds = range(4)
    cold = decode(model, PROMPT, Sample(temperature=0.5), 20, None, seeds)
    hot = decode(model, PROMPT, Sample(temperature=2.0), 20, None, seeds)

    def mean_entropy(generations):
        return sum(sum(g.sampling_entropies) for g in generations) / sum(len(g.sampling_entropies) for g in generations)

    assert mean_entropy(hot) > mean_entropy(cold) + 0.5


# --------------------------------------------------------------------------------- generation


def test_greedy_is_deterministic_and_sampling_follows_its_seed(model):
    first = generate(model, PROMPT, Greedy(), 30, None)
    assert first[0].tokens == generate(model, PROMPT, Greedy(), 30, None)[0].tokens
    a, b = generate(model, PROMPT, Sample(), 30, None, seeds=[7, 8])
    again = generate(model, PROMPT, Sample(), 30, None, seeds=[7])[0]
    assert a.tokens == again.tokens  # a row depends on its own seed, not on its batch
    assert a.tokens != b.tokens
    assert a.tokens != first[0].tokens


def test_top_k_one_equals_greedy(model):
    greedy = generate(model, PROMPT, Greedy(), 40, None)[0]
    for sample in generate(model, PROMPT, Sample(top_k=1), 40, None, seeds=[0, 1, 2]):
        assert sample.tokens == greedy.tokens


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_top_p_one_equals_plain_multinomial_under_the_same_seed(model, temperature):
    seeds = [0, 1, 2]
    plain = generate(model, PROMPT, Sample(temperature=temperature), 40, None, seeds)
    nucleus = generate(model, PROMPT, Sample(temperature=temperature, top_p=1.0), 40, None, seeds)
    assert [g.tokens for g in plain] == [g.tokens for g in nucleus]


def test_beam_width_one_equals_greedy(model):
    greedy = generate(model, PROMPT, Greedy(), 50, None)[0]
    assert beam_search(model, PROMPT, Beam(width=1), 50, None).tokens == greedy.tokens
    # With an end token too: take one that greedy produces, so both must stop there.
    eot = greedy.tokens[7]
    stopped = generate(model, PROMPT, Greedy(), 50, eot)[0]
    beam = beam_search(model, PROMPT, Beam(width=1, length_penalty=0.5), 50, eot)
    assert beam.tokens == stopped.tokens and beam.stopped_at_eot and stopped.stopped_at_eot


def test_contrastive_alpha_zero_equals_greedy(model):
    greedy = generate(model, PROMPT, Greedy(), 50, None)[0]
    for k in (1, 3, 6):
        assert contrastive_search(model, PROMPT, Contrastive(top_k=k, alpha=0.0), 50, None).tokens == greedy.tokens


STRATEGIES = [Greedy(), Sample(temperature=0.9, top_k=20, top_p=0.9), Sample(min_p=0.1),
              Beam(width=3), Contrastive(top_k=4, alpha=0.6)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: type(s).__name__)
def test_kv_cache_generation_equals_generation_without_cache(model, strategy):
    # 3 * BLOCK new tokens: the window slides (the cache is rebuilt) several times.
    cached = decode(model, PROMPT, strategy, 3 * BLOCK, None, seeds=[0, 1])
    recomputed = decode(model, PROMPT, strategy, 3 * BLOCK, None, seeds=[0, 1], use_cache=False)
    assert [g.tokens for g in cached] == [g.tokens for g in recomputed]
    assert all(len(g.tokens) == 3 * BLOCK for g in cached)  # no end token: runs to max_new_tokens
    for a, b in zip(cached, recomputed):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)


def test_a_prompt_longer_than_the_block_is_truncated_not_an_error(model):
    long_prompt = [i % VOCAB for i in range(2 * BLOCK + 3)]
    out = generate(model, long_prompt, Greedy(), 5, None)[0]
    assert out.tokens == generate(model, long_prompt[-BLOCK:], Greedy(), 5, None)[0].tokens


@pytest.mark.parametrize("strategy", [Greedy(), Sample(), Beam(width=1), Contrastive(top_k=3, alpha=0.0)],
                         ids=lambda s: type(s).__name__)
def test_generation_stops_at_the_end_token(model, strategy):
    free = decode(model, PROMPT, strategy, 30, None, seeds=[3])[0]
    eot = free.tokens[10]
    first = free.tokens.index(eot)
    stopped = decode(model, PROMPT, strategy, 30, eot, seeds=[3])[0]
    assert stopped.stopped_at_eot and stopped.tokens == free.tokens[:first]
    assert len(stopped.logprobs) == first + 1  # the end token is scored: the model chose to stop
    short = decode(model, PROMPT, strategy, first, eot, seeds=[3])[0]
    assert not short.stopped_at_eot and short.tokens == free.tokens[:first]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: type(s).__name__)
def test_recorded_logprobs_and_entropies_match_a_full_forward(model, strategy):
    generation = decode(model, PROMPT, strategy, BLOCK - len(PROMPT), None, seeds=[5])[0]
    sequence = torch.tensor([PROMPT + generation.tokens])
    with torch.no_grad():
        logits = model(sequence).logits[0, len(PROMPT) - 1:-1]
    expected = logits.log_softmax(-1).gather(1, sequence[0, len(PROMPT):, None])[:, 0]
    torch.testing.assert_close(torch.tensor(generation.logprobs), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(generation.entropies), entropy(logits), atol=1e-4, rtol=1e-4)


def test_beam_search_of_two_steps_equals_brute_force(model):
    width = 5
    with torch.no_grad():
        first = model(torch.tensor([PROMPT])).logits[0, -1].log_softmax(-1)
        candidates = first.topk(width).indices
        best_score, best = -math.inf, None
        for token in candidates.tolist():
            second = model(torch.tensor([PROMPT + [token]])).logits[0, -1].log_softmax(-1)
            score, next_token = second.max(dim=-1)
            if first[token] + score > best_score:
                best_score, best = float(first[token] + score), [token, int(next_token)]
    result = beam_search(model, PROMPT, Beam(width=width, length_penalty=0.0), 2, None)
    assert result.tokens == best
    assert sum(result.logprobs) == pytest.approx(best_score, abs=1e-4)


def test_contrastive_search_equals_the_definition_step_by_step(model):
    k, alpha, steps = 4, 0.6, 6
    tokens = list(PROMPT)
    with torch.no_grad():
        for _ in range(steps):
            out = model(torch.tensor([tokens]), return_hidden=True)
            probs = out.logits[0, -1].softmax(-1)
            context = out.hidden[0]
            scores = {}
            for v in probs.topk(k).indices.tolist():
                h_v = model(torch.tensor([tokens + [v]]), return_hidden=True).hidden[0, -1]
                penalty = F.cosine_similarity(h_v[None], context, dim=-1).max()
                scores[v] = float((1 - alpha) * probs[v] - alpha * penalty)
            tokens.append(max(scores, key=scores.get))
    result = contrastive_search(model, PROMPT, Contrastive(top_k=k, alpha=alpha), steps, None)
    assert result.tokens == tokens[len(PROMPT):]
    assert result.tokens != generate(model, PROMPT, Greedy(), steps, None)[0].tokens


# --------------------------------------------------------------------------------- bad params


@pytest.mark.parametrize("make, message", [
    (lambda: Sample(temperature=0.0), "temperature must be > 0"),
    (lambda: Sample(temperature=-1.0), "temperature must be > 0"),
    (lambda: Sample(top_k=0), "top_k must be >= 1"),
    (lambda: Sample(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda: Sample(top_p=1.2), r"top_p must be in \(0, 1\]"),
    (lambda: Sample(min_p=0.0), r"min_p must be in \(0, 1\]"),
    (lambda: Beam(width=0), "beam width must be >= 1"),
    (lambda: Beam(length_penalty=-1.0), "length_penalty must be >= 0"),
    (lambda: Contrastive(top_k=0), "top_k must be >= 1"),
    (lambda: Contrastive(alpha=1.5), r"alpha must be in \[0, 1\]"),
    (lambda: apply_temperature(random_logits(0), 0.0), "temperature must be > 0"),
    (lambda: top_k_filter(random_logits(0), 0), "top_k must be >= 1"),
    (lambda: top_p_filter(random_logits(0), 0.0), r"top_p must be in \(0, 1\]"),
    (lambda: top_p_filter(random_logits(0), 1.5), r"top_p must be in \(0, 1\]"),
    (lambda: min_p_filter(random_logits(0), 2.0), r"min_p must be in \(0, 1\]"),
])
def test_bad_params_fail_with_a_clear_message(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_generation_requests_fail_with_a_clear_message(model):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, PROMPT, Greedy(), 0, None)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], Greedy(), 5, None)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 61\)"):
        generate(model, [VOCAB], Greedy(), 5, None)
    with pytest.raises(ValueError, match="at least one seed"):
        generate(model, PROMPT, Sample(), 5, None, seeds=[])
    with pytest.raises(ValueError, match="must be < the vocabulary size"):
        beam_search(model, PROMPT, Beam(width=VOCAB), 5, None)
    with pytest.raises(ValueError, match="exceeds the vocabulary size"):
        contrastive_search(model, PROMPT, Contrastive(top_k=VOCAB + 1), 5, None)
