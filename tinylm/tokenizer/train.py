"""Byte-level BPE training: count pre-tokens (streaming, across processes), then merge pairs.

Counting reads the corpus in blocks cut at safe points (see `PreTokenizer.blocks`) and counts the
pre-tokens of each block in a worker process, with at most two blocks per worker in flight, so
memory grows with the number of distinct pre-tokens, not with the corpus.

The merge loop works on distinct pre-tokens ("words") weighted by their counts. It keeps, for
every adjacent pair, its total count and the words that contain it; merging a pair rewrites only
those words and adjusts the counts of the pairs they lose and gain. The most frequent pair comes
from a max-heap with lazy deletion: an entry whose count is out of date is refreshed when it
reaches the top. Ties go to the lexicographically greatest pair of byte strings.
"""
from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Iterable, Mapping, Sequence

from tqdm import tqdm

from tinylm.tokenizer.bpe import merge_pair
from tinylm.tokenizer.pretokenize import (PRETOKEN_RE, PreTokenizer, TokenizerError, check_special_tokens, read_utf8)

BLOCK_CHARS = 1 << 20


def check_vocab_size(vocab_size: int, special_tokens: Sequence[str]) -> None:
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: it counts the 256 bytes and the "
            f"{len(special_tokens)} special tokens, so it must be >= {minimum}")


# ---------------------------------------------------------------------------------------------
# Counting pre-tokens


_worker_pretokenizer: PreTokenizer | None = None


def _init_worker(special_tokens: list[str]) -> None:
    global _worker_pretokenizer
    _worker_pretokenizer = PreTokenizer(special_tokens)


def _count_block(block: str, pretokenizer: PreTokenizer | None = None) -> Counter[str]:
    pretokenizer = pretokenizer or _worker_pretokenizer
    counts: Counter[str] = Counter()
    for piece in pretokenizer.ordinary_pieces(block):
        counts.update(PRETOKEN_RE.findall(piece))
    return counts


def _tracked(chunks: Iterable[str], bar: tqdm) -> Iterable[str]:
    for chunk in chunks:
        bar.update(len(chunk.encode("utf-8")))
        yield chunk


def count_pretokens(input_path: str | os.PathLike, special_tokens: Sequence[str], workers: int = 1,
                    progress: bool = False) -> Counter[str]:
    """Pre-token -> number of occurrences in the file (text between special tokens only)."""
    pretokenizer = PreTokenizer(special_tokens)
    size = os.path.getsize(input_path) if os.path.exists(input_path) else None
    with tqdm(total=size, unit="B", unit_scale=True, desc="count pre-tokens", disable=not progress) as bar:
        blocks = pretokenizer.blocks(_tracked(read_utf8(input_path), bar), BLOCK_CHARS)
        if workers == 1 or (size or 0) < 2 * BLOCK_CHARS:
            total: Counter[str] = Counter()
            for block in blocks:
                total.update(_count_block(block, pretokenizer))
            return total
        return _count_parallel(blocks, pretokenizer.special_tokens, workers)


def _count_parallel(blocks: Iterable[str], special_tokens: list[str], workers: int) -> Counter[str]:
    total: Counter[str] = Counter()
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(special_tokens,)) as pool:
        in_flight = set()
        for block in blocks:
            in_flight.add(pool.submit(_count_block, block))
            if len(in_flight) >= 2 * workers:
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    total.update(future.result())
        for future in in_flight:
            total.update(future.result())
    return total


# ---------------------------------------------------------------------------------------------
# The merge loop


def _descending_key(token: bytes) -> str:
    """A string whose ascending order is the descending order of the byte strings.

    Each byte b becomes chr(255 - b) and a terminator chr(256) sorts after all of them, so a
    longer string sorts before its own prefix, as "greater" demands. heapq is a min-heap.
    """
    return "".join(chr(255 - b) for b in token) + chr(256)


def merge_pretokens(word_counts: Mapping[str, int], vocab_size: int, special_tokens: Sequence[str],
                    progress: bool = False) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Learn merges until the vocab (bytes + new tokens + specials) reaches `vocab_size`.

    Stops early, with a smaller vocab, when no pair is left (every word is a single token).
    """
    special_tokens = check_special_tokens(special_tokens)
    check_vocab_size(vocab_size, special_tokens)
    vocab = [bytes([b]) for b in range(256)]
    keys = [_descending_key(token) for token in vocab]

    words = [list(word.encode("utf-8")) for word in word_counts]
    counts = list(word_counts.values())
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[index]
            where[pair].add(index)
    heap = [(-count, keys[a], keys[b], a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    target = vocab_size - len(special_tokens)
    with tqdm(total=target - 256, desc="merges", unit="merge", disable=not progress) as bar:
        while len(vocab) < target and heap:
            negative, _, _, a, b = heapq.heappop(heap)
            count = pair_counts.get((a, b), 0)
            if count != -negative:
                # Stale: counted down since pushed (refresh it), or up (a fresher entry exists).
                if 0 < count < -negative:
                    heapq.heappush(heap, (-count, keys[a], keys[b], a, b))
                continue
            new = len(vocab)
            vocab.append(vocab[a] + vocab[b])
            keys.append(_descending_key(vocab[new]))
            merges.append((vocab[a], vocab[b]))
            bar.update(1)
            # Only pairs containing `new` can gain counts; all the others only lose.
            gained = set()
            for index in where.pop((a, b)):
                old_word = words[index]
                new_word = merge_pair(old_word, a, b, new)
                if len(new_word) == len(old_word):
                    continue  # the index is stale: an earlier merge took the pair out of this word
                weight = counts[index]
                for pair in zip(old_word, old_word[1:]):
                    pair_counts[pair] -= weight
                for pair in zip(new_word, new_word[1:]):
                    pair_counts[pair] += weight
                    if new in pair:
                        where[pair].add(index)
                        gained.add(pair)
                words[index] = new_word
            del pair_counts[(a, b)]
            for pair in gained:
                heapq.heappush(heap, (-pair_counts[pair], keys[pair[0]], keys[pair[1]], *pair))

    vocab.extend(token.encode("utf-8") for token in special_tokens)
    return dict(enumerate(vocab)), merges


def train_bpe(input_path: str | os.PathLike, vocab_size: int, special_tokens: Sequence[str],
              workers: int = 1, progress: bool = False) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train byte-level BPE on a UTF-8 file. vocab_size counts the bytes, merges and specials."""
    special_tokens = check_special_tokens(special_tokens)
    check_vocab_size(vocab_size, special_tokens)
    if workers < 1:
        raise TokenizerError(f"workers must be >= 1, got {workers}")
    word_counts = count_pretokens(input_path, special_tokens, workers, progress)
    if not word_counts:
        raise TokenizerError(f"{input_path}: no text to train on (the file is empty or holds only special tokens)")
    return merge_pretokens(word_counts, vocab_size, special_tokens, progress)
