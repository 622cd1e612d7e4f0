"""Two trained models scored on the same validation stories, story by story, for a paired comparison.

Each model reads the stories as evaluate_ppl does, as one stream scored in windows (evaluate.token_nll),
with one difference: an <|endoftext|> comes first, so the first story's first token is scored too (the
shards begin with it, and evaluate_ppl cannot score a stream's first token). Every byte of every story
is then scored under both models, whatever their tokenizers, and the total is eval.json's val_bpb but
for that one token. The per-target NLL is cut at the story boundaries: story i owns its tokens and the
<|endoftext|> that ends it, and the bytes they stand for (evaluate.token_byte_lengths).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylm.evaluate import token_byte_lengths, token_nll
from tinylm.model import GPT
from tinylm.tokenizer.bpe import Tokenizer


@dataclass(frozen=True)
class StoryScores:
    nll: np.ndarray  # total nats of each story (its tokens and the <|endoftext|> after it)
    num_bytes: np.ndarray  # UTF-8 bytes of each story, +1 for its <|endoftext|>


def story_scores(model: GPT, tokenizer: Tokenizer, stories: list[str], stride: int, batch_size: int,
                 desc: str) -> StoryScores:
    ids = [tokenizer.encode(story) for story in stories]
    stream = np.array([tokenizer.eot_id, *(t for story in ids for t in (*story, tokenizer.eot_id))], dtype=np.int64)
    nll = token_nll(model, stream, stride, batch_size, desc=desc)
    lengths = token_byte_lengths(tokenizer)[stream[1:]]
    # Target j is stream[j + 1]; story i's targets end at its closing <|endoftext|>.
    ends = np.cumsum([len(story) + 1 for story in ids])
    starts = np.concatenate([[0], ends[:-1]])
    return StoryScores(nll=np.add.reduceat(nll, starts), num_bytes=np.add.reduceat(lengths, starts).astype(np.float64))
