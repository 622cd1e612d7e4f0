"""Stories sampled at milestones during training: what the model writes as it learns.

At step 0 (the untrained model), every train.sample_interval steps and after the last step, each
prompt of train.sample_prompts is continued for at most train.sample_tokens tokens twice: greedily,
and once sampled at temperature 1 from the min-p 0.05 truncation (sample.min_p's default) with the
generator seeded by train.seed. The decoding is the sample_sweep's (`tinylm.generation.sampling`,
KV cache, each prompt after <|endoftext|>), in fp32 as the sweep and `tinylm generate` run the final
model, so the last milestone's greedy story is where the sweep's greedy story begins.

Sampling must not touch training: it runs in eval mode (no dropout) and puts the model back in its
previous mode, draws only from its own torch.Generator (never the global RNG that dropout and the
next checkpoint's RNG state come from), and changes no weight, so the weights, the logged metrics
and model.pt are the same bytes with sampling on or off (tests/test_milestone_samples.py). On the
CPU it decodes on one thread: decoding is a chain of small ops, each of which waits for a second
OpenMP thread whenever another job holds the other core (16x slower on the shared 2-core machine:
benchmarks/README.md, "Stories at milestones"); the thread count is restored after, so training's
matmuls run as before.

The process that writes the outputs (Distributed.writes_outputs) samples alone; the other ranks go
on to the next step, whose gradient all-reduce waits for it, so they wait exactly as long as the
sampling takes and no extra collective is added. Its rows ride in the checkpoint
(`MilestoneCheckpoint`): `dvc repro` deletes samples.jsonl (a declared output) before rerunning,
and the file of a killed run may hold rows past its last checkpoint, so a resumed run rewrites the
file from the checkpoint's rows, as `MetricLog` rebuilds the metrics, and no milestone is lost or
repeated.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from tinylm.config import TrainParams
from tinylm.generation.sampling import Greedy, Sample, decode
from tinylm.model import GPT
from tinylm.records.io import plain, write_records
from tinylm.records.milestones import MilestoneSample
from tinylm.tokenizer.bpe import Tokenizer
from tinylm.training.checkpoint import Position, RunCheckpoint

SAMPLES_FILE = "samples.jsonl"  # in the run's log directory: reports/train/samples.jsonl
MIN_P = 0.05
STRATEGIES: dict[str, Greedy | Sample] = {"greedy": Greedy(), f"min_p_{MIN_P:g}": Sample(min_p=MIN_P)}


def is_milestone(step: int, train: TrainParams) -> bool:
    """Step 0, every train.sample_interval steps, and the last step; never with sampling off (interval 0)."""
    if train.sample_interval == 0:
        return False
    return step % train.sample_interval == 0 or step == train.max_steps


@contextlib.contextmanager
def single_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the block on the CPU, the previous count after."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sample_milestone(model: GPT, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                     step: int) -> list[MilestoneSample]:
    """Each prompt continued by every strategy of STRATEGIES, from `model` as it is now (see the module doc)."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        with single_thread(model.wte.weight.device):
            for prompt in prompts:
                ids = [tokenizer.eot_id, *tokenizer.encode(prompt)]
                for name, strategy in STRATEGIES.items():
                    (generation,) = decode(model, ids, strategy, max_new_tokens, tokenizer.eot_id, seeds=(seed,))
                    rows.append(MilestoneSample(
                        step=step, prompt=prompt, strategy=name, seed=None if strategy.deterministic else seed,
                        text=tokenizer.decode(generation.tokens), tokens=len(generation.tokens),
                        stopped_at_eot=generation.stopped_at_eot,
                        mean_logprob=sum(generation.logprobs) / len(generation.logprobs)))
    finally:
        model.train(was_training)
    return rows


def console_lines(rows: list[MilestoneSample]) -> list[str]:
    """The rows as they print under the validation line: strategy, then the prompt and its continuation on
    one line (every line break, by str.splitlines' definition, becomes a space)."""
    width = max(len(row.strategy) for row in rows)
    return [f"  {row.strategy:<{width}} | {' '.join((row.prompt + row.text).splitlines())}" for row in rows]


class MilestoneSamples:
    """The run's milestone rows: sampled, printed and written to samples.jsonl by the process that
    writes the outputs (`enabled`) alone; the other processes sample, print and write nothing.
    Without a tokenizer nothing is sampled either (benchmarks that time the training alone)."""

    def __init__(self, train: TrainParams, tokenizer: Tokenizer | None, path: str | Path, enabled: bool):
        self.train = train
        self.tokenizer = tokenizer
        self.path = Path(path)
        self.enabled = enabled
        self.rows: list[MilestoneSample] = []

    def state(self) -> list[dict[str, Any]]:
        return [plain(row) for row in self.rows]

    def restore(self, state: list[dict[str, Any]]) -> None:
        self.rows = [MilestoneSample(**row) for row in state]

    def start(self) -> None:
        """Write the rows so far (a resumed run's, from its checkpoint): the file then holds exactly
        the milestones before the step the run continues from. Empty with sampling off: the file is
        a declared output either way."""
        if self.enabled:
            write_records(self.path, self.rows)

    def record(self, model: GPT, step: int) -> None:
        """Sample, print and append `step`'s rows if it is a milestone (on the writing process only)."""
        if not (self.enabled and self.tokenizer is not None and is_milestone(step, self.train)):
            return
        rows = sample_milestone(model, self.tokenizer, self.train.sample_prompts, self.train.sample_tokens,
                                self.train.seed, step)
        print("\n".join(console_lines(rows)), flush=True)
        self.rows += rows
        write_records(self.path, self.rows)


class MilestoneCheckpoint(RunCheckpoint):
    """The run's checkpoint, also carrying the milestone rows sampled so far (see the module doc)."""

    def __init__(self, *args: Any, milestones: MilestoneSamples, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.milestones = milestones

    def capture(self, position: Position) -> dict[str, Any] | None:
        state = super().capture(position)
        if state is not None:
            state["milestones"] = self.milestones.state()
        return state

    def restore(self, state: dict[str, Any]) -> Position:
        self.milestones.restore(state["milestones"])
        return super().restore(state)
