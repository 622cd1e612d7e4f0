"""An ordered map over a stream of stories on worker processes, in bounded memory.

The stories go to the workers in chunks of about `chunk_chars` characters (big enough that
sending them costs little beside the work, small enough to keep every worker busy), and the
results come back in input order, so the output does not depend on the number of workers. At
most two chunks per worker are in flight: the input is read only as fast as the workers consume
it, so memory stays flat however long the stream.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

R = TypeVar("R")

CHUNK_CHARS = 1 << 18


def chunks(stories: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    """Consecutive stories grouped into lists of about `chunk_chars` characters."""
    chunk: list[str] = []
    size = 0
    for story in stories:
        chunk.append(story)
        size += len(story)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _apply(function: Callable[[str], R], chunk: list[str]) -> list[R]:
    return [function(story) for story in chunk]


def ordered_map(function: Callable[[str], R], stories: Iterable[str], workers: int,
                chunk_chars: int = CHUNK_CHARS) -> Iterator[R]:
    """`function(story)` for every story, in order, on `workers` processes (in this one when 1).

    `function` must be picklable (a module-level function, or a functools.partial of one).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        yield from map(function, stories)
        return
    with ProcessPoolExecutor(workers) as pool:
        in_flight: deque = deque()
        for chunk in chunks(stories, chunk_chars):
            in_flight.append(pool.submit(_apply, function, chunk))
            if len(in_flight) >= 2 * workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()
