"""The encode_shards engine: our tokenizer's ids, computed by tiktoken's Rust core on all cores.

A document encodes to `Tokenizer.encode(document)` followed by `<|endoftext|>`. The engine gets
the same ids faster: it hands our merges to tiktoken as "mergeable ranks" (token bytes -> rank,
where rank = our id: ids 0..255 are bytes and merge k made id 256 + k) and runs `shards.workers`
processes over batches of documents, keeping their order.

Why tiktoken's algorithm gives our ids. tiktoken repeatedly merges the adjacent pair whose
concatenation has the lowest rank; we merge the adjacent pair that comes first in merges.txt.
These agree when (a) every token is made by one merge only, and (b) every token is what our
encoder makes of its own bytes: then two adjacent tokens that concatenate to a token are always
the pair whose merge made it, and its rank is that merge's position. BPE training guarantees
both, since it splits its words exactly as encoding does (GPT-2's merges satisfy them too).
`tiktoken_ranks` checks (a): ids in merge order, no token made twice; a tokenizer that fails it
is encoded by our own encoder in the worker processes instead. Special tokens never reach
tiktoken: we cut them out first with our pre-tokenizer, which prefers the longest special token
where several match (tiktoken leaves the order among overlapping ones unspecified). Equality is
proven on the whole validation split by tests/test_shards_engine.py, and the encode_shards stage
checks it again on the validation split it encodes.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import tiktoken

from tinylm.tokenizer.bpe import Tokenizer
from tinylm.tokenizer.pretokenize import PreTokenizer
from tinylm.corpus.parallel import chunks
from tinylm.corpus.shards import write_split
from tinylm.records.shards import ShardSplit


def tiktoken_ranks(tokenizer: Tokenizer) -> dict[bytes, int] | None:
    """Our ordinary tokens as tiktoken mergeable ranks, or None when tiktoken would not give our ids."""
    special_ids = set(tokenizer.special_tokens.values())
    ranks = {token: i for i, token in tokenizer.vocab.items() if i not in special_ids}
    if len(ranks) != 256 + len(tokenizer.merges) or sorted(ranks.values()) != list(range(len(ranks))):
        return None  # a token made by two merges, or ids not in merge order
    if any(len(token) != 1 for token, rank in ranks.items() if rank < 256):
        return None
    for k, (left, right) in enumerate(tokenizer.merges):
        if ranks.get(left + right) != 256 + k:
            return None
    return ranks


@dataclass(frozen=True)
class EncodedBatch:
    ids: np.ndarray  # uint16: each document's ids then <|endoftext|>
    documents: int
    text_bytes: int  # UTF-8 bytes of the documents


class DocumentEncoder:
    """Encodes documents in this process, with tiktoken's core when our merges export exactly."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.eot_id
        ranks = tiktoken_ranks(tokenizer)
        self.uses_tiktoken = ranks is not None
        if ranks is not None:
            self._pretokenizer = PreTokenizer(list(tokenizer.special_tokens))
            self._core = tiktoken.Encoding(name=f"tinylm-{tokenizer.fingerprint[:12]}", pat_str=tokenizer.pattern,
                                           mergeable_ranks=ranks, special_tokens={})

    def encode_document(self, text: str) -> list[int]:
        """`Tokenizer.encode(text)` followed by the <|endoftext|> id."""
        if not self.uses_tiktoken:
            return [*self.tokenizer.encode(text), self.eot_id]
        ids: list[int] = []
        for index, part in enumerate(self._pretokenizer.split_specials(text)):
            if index % 2:
                ids.append(self.tokenizer.special_tokens[part])
            elif part:
                ids.extend(self._core.encode_ordinary(part))
        ids.append(self.eot_id)
        return ids

    def encode_documents(self, documents: Sequence[str]) -> EncodedBatch:
        ids: list[int] = []
        for document in documents:
            ids.extend(self.encode_document(document))
        return EncodedBatch(np.array(ids, dtype=np.uint16), len(documents),
                            sum(len(document.encode("utf-8")) for document in documents))


_worker_encoder: DocumentEncoder | None = None


def _init_worker(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_tokens: list[str]) -> None:
    global _worker_encoder
    _worker_encoder = DocumentEncoder(Tokenizer(vocab, merges, special_tokens))


def _encode_in_worker(documents: list[str]) -> EncodedBatch:
    return _worker_encoder.encode_documents(documents)


class ParallelEncoder:
    """`workers` processes encoding batches of documents; results come back in input order.

    Use as a context manager; the pool starts once and serves every split.
    """

    def __init__(self, tokenizer: Tokenizer, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.local = DocumentEncoder(tokenizer)  # fails on a bad tokenizer before any process starts
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> ParallelEncoder:
        if self.workers > 1:
            tokenizer = self.local.tokenizer
            # Workers rebuild the tokenizer from its parts: small to send, and no encode cache.
            self._pool = ProcessPoolExecutor(self.workers, initializer=_init_worker, initargs=(
                tokenizer.vocab, tokenizer.merges, list(tokenizer.special_tokens)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def map(self, batches: Iterable[list[str]]) -> Iterator[EncodedBatch]:
        if self._pool is None:
            yield from map(self.local.encode_documents, batches)
            return
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append(self._pool.submit(_encode_in_worker, batch))
            if len(in_flight) >= 2 * self.workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


@dataclass(frozen=True)
class SplitStats:
    documents: int
    tokens: int  # <|endoftext|> included
    text_bytes: int
    shards: int
    seconds: float

    def record(self) -> ShardSplit:
        """The split's part of reports/shards.json, rounded to the digits worth reading."""
        content_tokens = self.tokens - self.documents
        return ShardSplit(
            documents=self.documents,
            tokens=self.tokens,
            text_bytes=self.text_bytes,
            # Text bytes per token of text (the <|endoftext|> separators are not text).
            bytes_per_token=round(self.text_bytes / content_tokens, 4) if content_tokens else 0.0,
            shards=self.shards,
            seconds=round(self.seconds, 3),
            mb_per_s=round(self.text_bytes / 1e6 / self.seconds, 3) if self.seconds else 0.0,
        )


def encode_split(encoder: ParallelEncoder, documents: Iterable[str], directory: str | Path, split: str,
                 shard_tokens: int, on_batch: Callable[[EncodedBatch], None] = lambda batch: None) -> SplitStats:
    """Encode a stream of documents into the split's shards; `on_batch` sees each batch (for progress)."""
    start = time.perf_counter()
    documents_seen = text_bytes = 0

    def ids() -> Iterator[np.ndarray]:
        nonlocal documents_seen, text_bytes
        for batch in encoder.map(chunks(documents)):
            documents_seen += batch.documents
            text_bytes += batch.text_bytes
            on_batch(batch)
            yield batch.ids

    tokenizer = encoder.local.tokenizer
    counts = write_split(directory, split, ids(), shard_tokens, tokenizer.vocab_size, tokenizer.fingerprint)
    return SplitStats(documents_seen, sum(counts), text_bytes, len(counts), time.perf_counter() - start)


def check_against_reference(tokenizer: Tokenizer, documents: Iterable[str], ids: np.ndarray, where: str) -> int:
    """Compare `ids` with the from-scratch encoder's ids of `documents` (each then <|endoftext|>).

    Returns the number of documents checked. A difference is a bug, not bad input: RuntimeError.
    """
    eot_id = tokenizer.eot_id
    offset = 0
    count = 0
    for count, document in enumerate(documents, start=1):
        expected = np.array([*tokenizer.encode(document), eot_id], dtype=np.int64)
        got = ids[offset:offset + expected.size]
        if got.size != expected.size or not np.array_equal(got, expected):
            raise RuntimeError(f"{where}: document {count - 1} encodes differently with the fast engine than "
                               "with Tokenizer.encode (a bug in tinylm/tokenizer/fast_encode.py or tinylm/tokenizer/bpe.py)")
        offset += expected.size
    if offset != ids.size:
        raise RuntimeError(f"{where}: {ids.size - offset} more ids than the documents encode to")
    return count
