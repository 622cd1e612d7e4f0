"""Load on `tinylm serve`: throughput and latency at 1, 8 and 32 concurrent streaming clients.

A real server (`tinylm serve --model DIR --port 0`, a subprocess) and the official `openai` client
(AsyncOpenAI, streaming): at each concurrency C, C clients each send requests one after another
until REQUESTS(C) have been answered; each request is "Once upon a time", max_tokens --new-tokens,
temperature 1, its own seed. Throughput: completion tokens (the usage the server reports) per
second of wall time. Latency per request: to the first text chunk, and to the end of the stream;
p50 and p95 over the requests. Reference: the same generation decoded in-process by
`tinylm.generation.sampling.decode` (what the server runs per request), tokens/s of one stream.
Target (exit code 1 if missed): 32 clients get at least 0.8x the throughput of one. On 2 cores
shared with other jobs, more clients cannot add much (one decode already keeps a core busy), and
runs differ by +-10%; the target catches a collapse (threads thrashing on the GIL, or requests
serialised behind one another). The ratio to in-process decoding is shown, not a target: the
client parses every chunk into the `openai` client's objects, on the same cores.

Models, randomly initialised (speed does not depend on the weights), on a BPE tokenizer trained
here on the shared train sample: `tiny` (2 layers, d_model 16, the tests' shape) and `cpu`
(params.yaml's model section: the CPU default's shape). The client runs on the same machine and
takes CPU from the server: on 2 cores, the figures are a floor.

    python benchmarks/bench_serve.py [--models tiny cpu] [--new-tokens 64] [--threads 8]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import torch

from tinylm.config import load_params
from tinylm.generation.sampling import Sample, decode
from tinylm.model import GPT, GPTConfig, save_trained_model
from tinylm.records.model import TrainingSummary
from tinylm.tokenizer.bpe import EOT, Tokenizer, load_tokenizer
from tinylm.tokenizer.train import train_bpe

ROOT = Path(__file__).resolve().parents[1]
TINYLM = Path(sys.executable).parent / "tinylm"
STORIES = ROOT.parent / "shared/data/tinystories/TinyStories-train-sample.txt"
PROMPT = "Once upon a time"
CONCURRENCY = (1, 8, 32)
TARGET_SCALING = 0.8


def requests_at(clients: int) -> int:
    return max(16, 2 * clients)


def model_configs(vocab_size: int) -> dict[str, GPTConfig]:
    params = load_params(ROOT / "params.yaml")
    return {"tiny": GPTConfig(vocab_size=vocab_size, block_size=512, n_layer=2, n_head=2, d_model=16),
            "cpu": GPTConfig.from_params(params.model, vocab_size)}


def save(model: GPT, tokenizer: Tokenizer, directory: Path) -> None:
    """As the pretrain stage saves a model (0 steps: the weights are random)."""
    loss = math.log(tokenizer.vocab_size)
    save_trained_model(model, directory, TrainingSummary(
        config=dataclasses.asdict(model.config), params=model.num_params(),
        params_without_embeddings=model.num_params(include_embeddings=False), steps=0, tokens_trained=0,
        final_train_loss=loss, final_val_loss=loss, tokenizer_fingerprint=tokenizer.fingerprint))


def in_process_tokens_per_second(model: GPT, tokenizer: Tokenizer, new_tokens: int, repeats: int = 5) -> float:
    torch.set_num_threads(1)  # as the server runs (tinylm.cli.models.resolve_device)
    ids = [tokenizer.eot_id, *tokenizer.encode(PROMPT)]
    best = float("inf")
    for seed in range(repeats):
        started = time.perf_counter()
        decode(model, ids, Sample(), new_tokens, None, [seed])
        best = min(best, time.perf_counter() - started)
    return new_tokens / best


class Server:
    def __init__(self, model_dir: Path, threads: int, log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen([str(TINYLM), "serve", "--model", str(model_dir), "--port", "0",
                                             "--threads", str(threads)], stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while not (found := re.search(r"at (http://\S+)/v1 ", log.read_text())):
            if self.process.poll() is not None:
                sys.exit(f"tinylm serve did not start:\n{log.read_text()}")
            time.sleep(0.1)
        self.url = found[1]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=30)


@dataclasses.dataclass
class Load:
    clients: int
    requests: int
    tokens: int
    seconds: float
    first_chunk: list[float]
    whole: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def load(url: str, clients: int, requests: int, new_tokens: int) -> Load:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    seeds = itertools.count()
    first_chunk, whole, tokens = [], [], 0

    async def one_client() -> None:
        nonlocal tokens
        while (seed := next(seeds)) < requests:
            started = time.perf_counter()
            stream = await client.completions.create(model="tinylm", prompt=PROMPT, max_tokens=new_tokens, seed=seed,
                                                     stream=True, stream_options={"include_usage": True})
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - started
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            whole.append(time.perf_counter() - started)
            first_chunk.append(first if first is not None else whole[-1])

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    seconds = time.perf_counter() - started
    await client.close()
    return Load(clients, requests, tokens, seconds, first_chunk, whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("tiny", "cpu"), default=["tiny", "cpu"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=8, help="the server's --threads")
    args = parser.parse_args()

    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        configs = model_configs(load_params(ROOT / "params.yaml").tokenizer.vocab_size)
        vocab_size = configs["cpu"].vocab_size
        Tokenizer(*train_bpe(STORIES, vocab_size, [EOT]), [EOT]).save(tmp / "tokenizer")
        tokenizer = load_tokenizer(tmp / "tokenizer")
        print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} | server --threads "
              f"{args.threads} | {args.new_tokens} new tokens per request")
        for name in args.models:
            torch.manual_seed(0)
            model = GPT(dataclasses.replace(configs[name], vocab_size=tokenizer.vocab_size)).eval()
            save(model, tokenizer, tmp / name)
            reference = in_process_tokens_per_second(model, tokenizer, args.new_tokens)
            print(f"\n{name}: {model.config.n_layer} layers, d_model {model.config.d_model}, "
                  f"{model.num_params():,} params | in-process decode: {reference:,.0f} tok/s")
            print("| clients | requests | tok/s | x in-process | first chunk p50 / p95 (ms) | whole p50 / p95 (ms) |")
            print("|---:|---:|---:|---:|---|---|")
            server = Server(tmp / name, args.threads, tmp / f"{name}.log")
            try:
                asyncio.run(load(server.url, 1, 2, args.new_tokens))  # warm-up: threads, first allocations
                results = {clients: asyncio.run(load(server.url, clients, requests_at(clients), args.new_tokens))
                           for clients in CONCURRENCY}
            finally:
                server.stop()
            for result in results.values():
                print(f"| {result.clients} | {result.requests} | {result.tokens_per_second:,.0f} | "
                      f"{result.tokens_per_second / reference:.2f}x | "
                      f"{1000 * percentile(result.first_chunk, 50):,.0f} / {1000 * percentile(result.first_chunk, 95):,.0f} | "
                      f"{1000 * percentile(result.whole, 50):,.0f} / {1000 * percentile(result.whole, 95):,.0f} |")
            scaling = results[32].tokens_per_second / results[1].tokens_per_second
            print(f"32 clients: {scaling:.2f}x one client's throughput (target >= {TARGET_SCALING}x)")
            failed |= scaling < TARGET_SCALING
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
