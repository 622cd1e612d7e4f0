"""Incremental decoding on the KV cache, shared by every strategy, and what a generation records.

`Decoder` feeds a batch of rows one new token per row per step. The model sees at most block_size
positions: when one more token would not fit, the cache is rebuilt from the last block_size // 2
tokens of each row, so long generations keep going at the cost of one prefill every
block_size // 2 steps (sliding by one token would need a full forward at every step, since the
learned positions of every cached key would shift). With `use_cache=False` every step recomputes
the same visible window from scratch: the reference the cache must match token for token, and
the baseline of benchmarks/bench_generate.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from tinylm.model import GPT, KVCache


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) per row; -inf logits are tokens of probability 0."""
    return torch.special.entr(logits.softmax(dim=-1)).sum(dim=-1)


class Step(NamedTuple):
    logits: torch.Tensor  # [B, V] next-token logits after the last position
    # [B, T, d_model] final hidden states of the positions this step computed: the new one, or the
    # whole visible window when `rebuilt` (None unless the decoder was asked for hidden states).
    hidden: torch.Tensor | None
    rebuilt: bool


class Decoder:
    def __init__(self, model: GPT, use_cache: bool = True, return_hidden: bool = False):
        self.model = model
        self.use_cache = use_cache
        self.return_hidden = return_hidden
        self.block_size = model.config.block_size
        self.rows = torch.empty(0, 0, dtype=torch.long)
        self.cache: KVCache | None = None

    def start(self, prompt: torch.Tensor, batch_size: int) -> Step:
        """Prefill `prompt` [T] (its last block_size tokens) once and copy it into batch_size rows."""
        self.rows = prompt[None, -self.block_size:]
        step = self._forward_window()
        expand = torch.zeros(batch_size, dtype=torch.long, device=prompt.device)
        self.reorder(expand)
        hidden = step.hidden.index_select(0, expand) if step.hidden is not None else None
        return Step(step.logits.index_select(0, expand), hidden, rebuilt=True)

    def step(self, tokens: torch.Tensor) -> Step:
        """Append tokens [B] (one per row) and return the logits that follow them."""
        self.rows = torch.cat([self.rows, tokens[:, None]], dim=1)
        if self.rows.shape[1] > self.block_size:
            self.rows = self.rows[:, -(self.block_size // 2):]
            return self._forward_window()
        if not self.use_cache:
            step = self._forward_window()
            hidden = step.hidden[:, -1:] if step.hidden is not None else None
            return Step(step.logits, hidden, rebuilt=False)
        out = self.model(tokens[:, None], kv_cache=self.cache, return_hidden=self.return_hidden)
        return Step(out.logits[:, -1], out.hidden, rebuilt=False)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` in that order (a row may repeat): beam search, contrastive search."""
        self.rows = self.rows.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)

    def _forward_window(self) -> Step:
        self.cache = self.model.new_kv_cache(self.rows.shape[0]) if self.use_cache else None
        out = self.model(self.rows, kv_cache=self.cache, return_hidden=self.return_hidden)
        return Step(out.logits[:, -1], out.hidden, rebuilt=True)


def check_prompt(model: GPT, prompt: Sequence[int]) -> torch.Tensor:
    """The prompt as a LongTensor on the model's device, or a ValueError saying what is wrong."""
    if len(prompt) == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. <|endoftext|> to start a story)")
    ids = torch.as_tensor(list(prompt), dtype=torch.long, device=model.wte.weight.device)
    if int(ids.min()) < 0 or int(ids.max()) >= model.config.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {model.config.vocab_size}), "
                         f"got {int(ids.min())}..{int(ids.max())}")
    return ids


def check_length(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


@dataclass
class Generation:
    tokens: list[int]  # the new tokens, without a final <|endoftext|>
    stopped_at_eot: bool
    # One entry per produced token, the final <|endoftext|> included (the model chose to stop):
    logprobs: list[float]  # the model's log p of the token (temperature 1, unfiltered)
    entropies: list[float]  # entropy of the model's next-token distribution there (nats)
    sampling_entropies: list[float]  # entropy of the distribution the token was drawn from

    @property
    def nll(self) -> float:
        return -sum(self.logprobs)


def rows_to_generations(tokens: torch.Tensor, logprobs: torch.Tensor, entropies: torch.Tensor,
                        sampling_entropies: torch.Tensor, eot_id: int | None) -> list[Generation]:
    """Per-step records [B, steps] to generations, each row cut after its first <|endoftext|>
    (rows that finished early kept stepping with the batch; what follows is discarded)."""
    generations = []
    for row in range(tokens.shape[0]):
        ids = tokens[row].tolist()
        stopped = eot_id is not None and eot_id in ids
        produced = ids.index(eot_id) + 1 if stopped else len(ids)
        generations.append(Generation(
            tokens=ids[:produced - 1] if stopped else ids,
            stopped_at_eot=stopped,
            logprobs=logprobs[row, :produced].tolist(),
            entropies=entropies[row, :produced].tolist(),
            sampling_entropies=sampling_entropies[row, :produced].tolist(),
        ))
    return generations
