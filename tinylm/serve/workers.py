"""The model runs off the event loop: each generation on a thread of a small pool, its tokens
handed to the loop as they are decoded.

Decoding is `tinylm.generation.sampling.decode`, the function behind `tinylm generate`, with one
seed per call: a request's tokens depend on its seed and knobs only, never on what else is being
served (batching requests together would change the matmul shapes, and so the last bits of the
logits a sample is drawn from). Threads interleave the requests: torch releases the GIL inside
each op, so the pool keeps both cores busy while the loop keeps answering. A request beyond the
pool's threads waits in its queue.

Stopping: the consumer (an HTTP response) sets the job's event when its client goes away or a
stop sequence has ended the text; decode's `on_step` raises `StopDecoding` at the next token, so
the thread is free after at most one more step, and a job still queued never starts.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, TypeVar

import torch

from tinylm.cli.models import Loaded
from tinylm.generation.sampling import Strategy, decode

T = TypeVar("T")
_DONE = object()  # the end of a job's tokens, on its queue


class StopDecoding(Exception):
    """Raised from on_step: nobody wants this generation's next tokens."""


@dataclass(frozen=True)
class Job:
    loaded: Loaded
    ids: list[int]  # the prompt's ids, <|endoftext|> first
    strategy: Strategy
    max_tokens: int
    seed: int


class Workers:
    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tinylm-decode")
        self._lock = threading.Lock()
        self.running = 0  # generations on a thread now
        self.stopped_early = 0  # generations stopped before their end: client gone, or a stop sequence

    async def call(self, function: Callable[..., T], *args) -> T:
        """function(*args) on the pool (a forward for scoring or attention), awaited from the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def tokens(self, job: Job) -> AsyncIterator[list[int]]:
        """The job's new token ids as they are decoded, the <|endoftext|> that ends a story included: each
        time the loop gets to it, every token decoded since (one, unless the loop is busier than the
        thread, when sending them together saves an event per token). Leaving the iteration (aclose, or
        cancellation) stops the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def on_step(tokens: torch.Tensor) -> None:
            if stop.is_set():
                raise StopDecoding
            loop.call_soon_threadsafe(queue.put_nowait, int(tokens[0]))

        def work() -> None:
            if stop.is_set():
                return
            with self._lock:
                self.running += 1
            try:
                decode(job.loaded.model, job.ids, job.strategy, job.max_tokens, job.loaded.tokenizer.eot_id,
                       [job.seed], on_step=on_step)
            except StopDecoding:
                with self._lock:
                    self.stopped_early += 1
            finally:
                with self._lock:
                    self.running -= 1

        future = loop.run_in_executor(self.pool, work)
        future.add_done_callback(lambda _: queue.put_nowait(_DONE))
        try:
            done = False
            while not done:
                tokens = [await queue.get()]
                while not queue.empty():
                    tokens.append(queue.get_nowait())
                if done := tokens[-1] is _DONE:
                    tokens.pop()
                if tokens:
                    yield tokens
            future.result()  # an error in decode is the request's error
        finally:
            stop.set()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
