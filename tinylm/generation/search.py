"""Deterministic searches that need the model inside the decision: beam search and contrastive search.

Both keep one KV-cache row per live candidate (`Decoder.reorder` copies the rows that survive), so a
step costs one batched forward of width rows of one token each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F

from tinylm.generation.decoder import Decoder, Generation, check_length, check_prompt, entropy
from tinylm.model import GPT


@dataclass(frozen=True)
class Beam:
    deterministic: ClassVar[bool] = True
    width: int = 4
    # Hypotheses are ranked by sum log p / length ** length_penalty (0: the raw sum, which favours
    # short ones; 1: the mean log-probability per token).
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"beam width must be >= 1, got {self.width}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {self.length_penalty}")


@dataclass(frozen=True)
class Contrastive:
    """Su et al. 2022: among the top_k tokens pick argmax (1 - alpha) p(v) - alpha max_j cos(h_v, h_j),
    h_j the final hidden states of the context: a likely token that does not repeat what was said."""

    deterministic: ClassVar[bool] = True
    top_k: int = 4
    alpha: float = 0.6

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"contrastive alpha must be in [0, 1], got {self.alpha}")
        if self.top_k < 1:
            raise ValueError(f"contrastive top_k must be >= 1, got {self.top_k}")


@torch.inference_mode()
def beam_search(model: GPT, prompt: Sequence[int], beam: Beam, max_new_tokens: int, eot_id: int | None,
                use_cache: bool = True) -> Generation:
    """The best hypothesis of a width-`beam.width` beam search.

    A hypothesis ends when <|endoftext|> is among the top `width` candidates of a step (as in
    Hugging Face); the search stops once `width` hypotheses have ended (HF's early_stopping=True)
    or at max_new_tokens, where the live beams join the ended ones. Width 1 is greedy decoding.
    """
    check_length(max_new_tokens)
    ids = check_prompt(model, prompt)
    vocab, width = model.config.vocab_size, beam.width
    if width >= vocab:
        raise ValueError(f"beam width {width} must be < the vocabulary size {vocab}")
    decoder = Decoder(model, use_cache=use_cache)
    logits = decoder.start(ids, batch_size=width).logits
    # All rows start identical: only row 0 may expand at the first step.
    scores = torch.full((width,), float("-inf"), device=ids.device)
    scores[0] = 0.0
    tokens = torch.empty(width, 0, dtype=torch.long, device=ids.device)
    logprob_history = torch.empty(width, 0, device=ids.device)
    entropy_history = torch.empty(width, 0, device=ids.device)
    ended: list[tuple[float, Generation]] = []

    def hypothesis(row: int, token: int, score: float, step_logprobs: torch.Tensor,
                   step_entropy: torch.Tensor, stopped: bool) -> tuple[float, Generation]:
        length = tokens.shape[1] + 1
        generation = Generation(
            tokens=tokens[row].tolist() + ([] if stopped else [token]),
            stopped_at_eot=stopped,
            logprobs=logprob_history[row].tolist() + [float(step_logprobs[row, token])],
            entropies=entropy_history[row].tolist() + [float(step_entropy[row])],
            sampling_entropies=[0.0] * length,
        )
        return score / length ** beam.length_penalty, generation

    for step in range(max_new_tokens):
        step_logprobs = logits.log_softmax(dim=-1)
        step_entropy = entropy(logits)
        candidate_scores, candidates = (scores[:, None] + step_logprobs).view(-1).topk(2 * width)
        # 2 * width candidates hold at least width that do not end: each row has one <|endoftext|>.
        keep = []
        for rank, (score, candidate) in enumerate(zip(candidate_scores.tolist(), candidates.tolist())):
            if score == float("-inf") or len(keep) == width:
                break
            row, token = divmod(candidate, vocab)
            if token == eot_id:
                if rank < width:
                    ended.append(hypothesis(row, token, score, step_logprobs, step_entropy, stopped=True))
            else:
                keep.append(rank)
        if len(ended) >= width:
            break
        if step == max_new_tokens - 1:
            for rank in keep:
                row, token = divmod(int(candidates[rank]), vocab)
                ended.append(hypothesis(row, token, float(candidate_scores[rank]), step_logprobs, step_entropy,
                                        stopped=False))
            break
        kept = torch.tensor(keep, device=ids.device)
        rows, next_tokens = candidates[kept] // vocab, candidates[kept] % vocab
        tokens = torch.cat([tokens[rows], next_tokens[:, None]], dim=1)
        logprob_history = torch.cat([logprob_history[rows], step_logprobs[rows, next_tokens][:, None]], dim=1)
        entropy_history = torch.cat([entropy_history[rows], step_entropy[rows][:, None]], dim=1)
        scores = candidate_scores[kept]
        decoder.reorder(rows)
        logits = decoder.step(next_tokens).logits
    return max(ended, key=lambda scored: scored[0])[1]


@torch.inference_mode()
def contrastive_search(model: GPT, prompt: Sequence[int], contrastive: Contrastive, max_new_tokens: int,
                       eot_id: int | None, use_cache: bool = True,
                       on_step: Callable[[torch.Tensor], None] | None = None) -> Generation:
    """Contrastive search: each step feeds the top_k candidates as top_k cache rows (one batched
    forward gives every candidate's hidden state and, for the winner, the next logits), then keeps
    the winner's row. The degeneration penalty compares with the hidden states of the visible
    window (the whole context until generation passes block_size). alpha = 0 is greedy decoding.
    on_step receives each chosen token as a tensor [1], the final <|endoftext|> included."""
    check_length(max_new_tokens)
    ids = check_prompt(model, prompt)
    k, alpha = contrastive.top_k, contrastive.alpha
    if k > model.config.vocab_size:
        raise ValueError(f"contrastive top_k {k} exceeds the vocabulary size {model.config.vocab_size}")
    decoder = Decoder(model, use_cache=use_cache, return_hidden=True)
    step = decoder.start(ids, batch_size=k)
    context = F.normalize(step.hidden[0], dim=-1)  # [T, d_model], unit length for cosines
    logits = step.logits[0]
    tokens, logprobs, entropies = [], [], []
    stopped = False
    for _ in range(max_new_tokens):
        step_logprobs = logits.log_softmax(dim=-1)
        candidate_logprobs, candidates = step_logprobs.topk(k)
        step = decoder.step(candidates)
        if step.rebuilt:
            # The rows differ only in their last token (the candidate), so row 0 holds the context.
            context = F.normalize(step.hidden[0, :-1], dim=-1)
        candidate_hidden = F.normalize(step.hidden[:, -1], dim=-1)  # [k, d_model]
        degeneration = (candidate_hidden @ context.T).amax(dim=1)
        best = int(((1 - alpha) * candidate_logprobs.exp() - alpha * degeneration).argmax())
        token = int(candidates[best])
        logprobs.append(float(candidate_logprobs[best]))
        entropies.append(float(entropy(logits)))
        if on_step is not None:
            on_step(candidates[best:best + 1])
        if token == eot_id:
            stopped = True
            break
        tokens.append(token)
        context = torch.cat([context, candidate_hidden[best:best + 1]])
        decoder.reorder(torch.full((k,), best, dtype=torch.long, device=ids.device))
        logits = step.logits[best]
    return Generation(tokens, stopped, logprobs, entropies, sampling_entropies=[0.0] * len(logprobs))
