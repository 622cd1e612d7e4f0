"""The GPU check: one prepared run that proves the CUDA path on a lent GPU and measures it (docs/gpus.md).

Phases, in this order (the cheap, essential figures first, so a run cut short still has them):
  1. cuda_tests: `pytest --noconftest -m cuda tests/test_cuda.py` in a subprocess: passed, failed, skipped;
  2. train: for each recipe (conf/recipe/*.yaml, then the profile, composed by Hydra as `dvc exp run`
     composes params.yaml), the profile's model trained through the real `Trainer.run()` for a fixed
     number of steps: tokens/s and MFU over the timed steps (progress.py's MFU against the profile's
     train.peak_flops, the dense BF16 peak of an H100/H200), peak memory, compile time;
  3. resume: the same run sent a real SIGTERM mid-run, then rerun: the largest loss difference
     against an uninterrupted run (dropout on, so the restored RNG states matter);
  4. generate: decoding tokens/s with and without the KV cache (bench_generate.decoding_speed);
  5. micro_batch: the profile's batch split into other micro-batches (same sequences per step), each
     trained as in 2 while the time budget lasts; the best micro-batch per recipe.
The JSON (`--out`, default $OUT/gpu_check.json) is rewritten atomically after every phase, with
`complete` false until the end. A phase that raises is recorded under `errors` (traceback in the
log) and the next one runs, so one failure does not cost the other figures. Exit code 1 if a phase
failed or a CUDA test failed; the MFU target (>= 40%) is reported, not enforced.

Shards: synthetic, made by the script: ../shared does not travel to the GPU machine, and real
TinyStories ids would need an 8192-token tokenizer trained first (minutes of CPU for figures that do
not depend on what the ids say). Random phrases repeated in random order (so the loss falls), written
with the pipeline's shard writer and read back memory-mapped, as the pretrain stage reads data/shards.

    python benchmarks/gpu_check.py [--out PATH] [--budget-s 420]   # on the GPU (bash benchmarks/gpu_check.sh run)
    python benchmarks/gpu_check.py --dry --out /tmp/gpu_check.json  # CPU, tiny profile, eager, a few steps
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench_generate import CASES, decoding_speed
from tinylm.config import Params, TrainParams, parse_params
from tinylm.corpus.shards import load_split, write_split
from tinylm.errors import PipelineError, run_stage
from tinylm.model import GPT, GPTConfig
from tinylm.records.io import write_record
from tinylm.training.progress import model_flops_utilization
from tinylm.training.trainer import Trainer, TrainingInterrupted

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml"))
MFU_TARGET = 0.40


@dataclass(frozen=True)
class Mode:
    """How big and how long: the GPU run, or the CPU dry run that CI uses to prove the script."""

    name: str
    profile: str  # conf/profile/<profile>.yaml, composed over each recipe
    device: str
    compile: bool
    # Training logs every log_interval steps, as a real run does: the rows' dvclive writes then hide the
    # GPU's last optimizer kernels of a window once per window, not once per step. Step 0 and the first
    # window are the warm-up (torch.compile compiles in step 0); the next timed_windows are timed.
    log_interval: int
    timed_windows: int
    micro_batches: tuple[int, ...]  # tried in this order; each must divide the profile's sequences per step
    resume_steps: int
    sigterm_after: int  # the signal is sent right after this update; the run stops after the next
    train_tokens: int
    val_tokens: int
    new_tokens: int  # generated after a prompt of block_size - new_tokens tokens
    decode_repeats: int
    tests_timeout_s: int


GPU = Mode("gpu", "gpu", "cuda", True, 10, 3, (128, 64, 32), 40, 19, 2_000_000, 200_000, 64, 3, 300)
DRY = Mode("dry", "tiny", "cpu", False, 1, 3, (4, 2), 8, 3, 20_000, 4_000, 16, 2, 120)


# --- what the JSON holds ------------------------------------------------------------------------


@dataclass(frozen=True)
class CudaTests:
    passed: int
    failed: int  # failures and errors
    skipped: int
    failures: list[str]  # test ids
    seconds: float


@dataclass(frozen=True)
class TrainRun:
    recipe: str
    micro_batch_size: int
    grad_accum_steps: int
    batch_tokens: int  # per optimizer step
    params: int
    flops_per_token: float
    precision: str
    compiled: bool
    timed_steps: int
    step_ms: float  # mean over the timed steps
    tokens_per_s: float
    mfu: float  # of train.peak_flops
    peak_memory_gb: float | None  # torch.cuda.max_memory_allocated; None on CPU
    compile_s: float  # what the warm-up steps took beyond as many timed ones
    first_loss: float
    last_loss: float
    val_loss: float
    wall_s: float  # the whole run: model, compilation, evaluations, checkpoint


@dataclass(frozen=True)
class ResumeRun:
    recipe: str
    steps: int
    sigterm_after_step: int
    resumed_at_step: int
    dropout: float
    compared_rows: int
    max_train_loss_diff: float
    max_val_loss_diff: float


@dataclass(frozen=True)
class DecodingCase:
    case: str
    cached_tokens_per_s: float
    uncached_tokens_per_s: float
    speedup: float


@dataclass(frozen=True)
class Generation:
    recipe: str
    params: int
    context: int
    new_tokens: int
    cases: list[DecodingCase]


@dataclass
class Report:
    mode: str
    command: str
    machine: dict[str, str | int | float | None]
    mfu_target: float = MFU_TARGET
    complete: bool = False
    elapsed_s: float = 0.0
    cuda_tests: CudaTests | None = None
    train: dict[str, list[TrainRun]] = field(default_factory=dict)
    best_micro_batch: dict[str, int] = field(default_factory=dict)
    skipped_micro_batches: dict[str, list[int]] = field(default_factory=dict)  # over the time budget
    resume: list[ResumeRun] = field(default_factory=list)
    max_resume_loss_diff: float | None = None
    generate: list[Generation] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # phase -> the exception that stopped it


# --- inputs -------------------------------------------------------------------------------------


def compose_params(recipe: str, profile: str) -> Params:
    """conf/config.yaml, then the recipe, then the profile: what `dvc exp run -S recipe=.. -S profile=..` trains."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        raw = compose(config_name="config", overrides=[f"recipe={recipe}", f"profile={profile}"])
    return parse_params(OmegaConf.to_container(raw))


@dataclass(frozen=True)
class Shards:
    train: list[np.ndarray]
    val: list[np.ndarray]
    fingerprint: str  # stands in for the tokenizer's


def synthetic_shards(directory: Path, vocab_size: int, mode: Mode, shard_tokens: int) -> Shards:
    """512 random phrases of 16 ids, concatenated in a random order: learnable, so the loss falls."""
    rng = np.random.default_rng(0)
    phrases = rng.integers(0, vocab_size, (512, 16))
    fingerprint = hashlib.sha256(f"gpu_check synthetic phrases, vocab {vocab_size}".encode()).hexdigest()
    for split, count in (("train", mode.train_tokens), ("val", mode.val_tokens)):
        order = rng.integers(0, len(phrases), count // phrases.shape[1] + 1)
        write_split(directory, split, [phrases[order].ravel()[:count]], shard_tokens, vocab_size, fingerprint)
    return Shards(load_split(directory, "train", fingerprint), load_split(directory, "val", fingerprint), fingerprint)


def run_params(train: TrainParams, mode: Mode, steps: int, log_interval: int,
               micro_batch_size: int | None = None) -> TrainParams:
    """The recipe's training for `steps`, evaluated at the start and end only, saved at the end, no milestone
    stories (the ids are synthetic): all of it outside the `train_step`s the Trainer times."""
    sequences = train.micro_batch_size * train.grad_accum_steps
    micro = micro_batch_size or train.micro_batch_size
    if sequences % micro:
        raise ValueError(f"micro-batch {micro} does not divide the profile's {sequences} sequences per step")
    return dataclasses.replace(train, device=mode.device, compile=mode.compile, micro_batch_size=micro,
                               grad_accum_steps=sequences // micro, max_steps=steps,
                               warmup_steps=min(train.warmup_steps, steps - 1), eval_interval=steps,
                               eval_batches=min(train.eval_batches, 4), log_interval=log_interval, checkpoint_interval=steps,
                               sample_interval=0)


def make_trainer(kind: type[Trainer], directory: Path, config: GPTConfig, train: TrainParams, shards: Shards,
                 **kwargs) -> Trainer:
    return kind(config, train, shards.train, shards.val, checkpoint_path=directory / "last.pt",
                log_dir=directory / "reports", tokenizer_fingerprint=shards.fingerprint, **kwargs)


def fresh_device_state(device: str) -> None:
    """Drop the last run's compiled graphs and GPU memory, so each run compiles and peaks on its own."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def metric(history: list[dict], name: str) -> dict[int, float]:
    return {row["step"]: row[name] for row in history if name in row}


# --- phases -------------------------------------------------------------------------------------


def cuda_tests(mode: Mode) -> CudaTests:
    """pytest -m cuda tests/test_cuda.py, its output streamed into this log, its results read from JUnit XML.
    Without tests/conftest.py, which hides every GPU from the suite (CUDA_VISIBLE_DEVICES="")."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "--noconftest", "-m", "cuda", "-n", "0", "-p", "no:randomly",
                   "-p", "no:cacheprovider", "-q", f"--junitxml={xml}", "tests/test_cuda.py"]
        code = subprocess.run(command, cwd=REPO, timeout=mode.tests_timeout_s).returncode
        if code not in (0, 1) or not xml.is_file():  # 1: some tests failed; anything else: pytest itself did
            raise RuntimeError(f"{' '.join(command)} exited {code}")
        cases = list(ET.parse(xml).getroot().iter("testcase"))
    outcome = {id(case): next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
               for case in cases}
    failures = [f"{case.get('classname')}::{case.get('name')}" for case in cases
                if outcome[id(case)] in ("failure", "error")]
    return CudaTests(passed=sum(o == "passed" for o in outcome.values()), failed=len(failures),
                     skipped=sum(o == "skipped" for o in outcome.values()), failures=failures,
                     seconds=round(time.perf_counter() - started, 1))


def train_run(mode: Mode, workdir: Path, recipe: str, params: Params, shards: Shards,
              micro_batch_size: int | None = None) -> TrainRun:
    started = time.perf_counter()
    config = GPTConfig.from_params(params.model, params.tokenizer.vocab_size)
    steps = 1 + mode.log_interval * (1 + mode.timed_windows)
    train = run_params(params.train, mode, steps, mode.log_interval, micro_batch_size)
    fresh_device_state(mode.device)
    trainer = make_trainer(Trainer, workdir / f"train-{recipe}-{train.micro_batch_size}", config, train, shards)
    result = trainer.run()
    rows = [row for row in trainer.log.history if "tokens_per_s" in row]  # one per window: 0, then the log steps
    counts = [1] + [b["step"] - a["step"] for a, b in zip(rows, rows[1:])]  # the steps each row timed
    seconds = [trainer.batch_tokens * n / row["tokens_per_s"] for n, row in zip(counts, rows)]
    untimed_steps, timed_steps = sum(counts[:2]), sum(counts[2:])
    timed_s = sum(seconds[2:])
    tokens_per_s = trainer.batch_tokens * timed_steps / timed_s
    return TrainRun(
        recipe=recipe, micro_batch_size=train.micro_batch_size, grad_accum_steps=train.grad_accum_steps,
        batch_tokens=trainer.batch_tokens, params=trainer.model.num_params(), flops_per_token=trainer.flops_per_token,
        precision=trainer.precision, compiled=train.compile, timed_steps=timed_steps,
        step_ms=1e3 * timed_s / timed_steps, tokens_per_s=tokens_per_s,
        mfu=model_flops_utilization(trainer.flops_per_token, tokens_per_s, train.peak_flops, world_size=1),
        peak_memory_gb=rows[-1].get("peak_memory_gb"),
        compile_s=max(0.0, sum(seconds[:2]) - untimed_steps * timed_s / timed_steps),
        first_loss=rows[0]["train_loss"], last_loss=rows[-1]["train_loss"], val_loss=result.val_loss,
        wall_s=time.perf_counter() - started)


class SigtermAfter(Trainer):
    """The real Trainer, sent a real SIGTERM (what a scheduler sends) right after update `sigterm_after`."""

    def __init__(self, *args, sigterm_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigterm_after = sigterm_after

    def train_step(self):
        stats = super().train_step()
        if stats.step == self.sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats


def resume_run(mode: Mode, workdir: Path, recipe: str, params: Params, shards: Shards) -> ResumeRun:
    """An uninterrupted run against one stopped by SIGTERM and rerun from its checkpoint: every logged loss."""
    config = dataclasses.replace(GPTConfig.from_params(params.model, params.tokenizer.vocab_size), dropout=0.1)
    train = dataclasses.replace(run_params(params.train, mode, mode.resume_steps, log_interval=1), compile=False,
                                eval_interval=max(1, mode.resume_steps // 4))
    fresh_device_state(mode.device)
    reference = make_trainer(Trainer, workdir / f"uninterrupted-{recipe}", config, train, shards)
    reference.run()
    interrupted = workdir / f"interrupted-{recipe}"
    try:
        make_trainer(SigtermAfter, interrupted, config, train, shards, sigterm_after=mode.sigterm_after).run()
        raise RuntimeError(f"SIGTERM after step {mode.sigterm_after} did not stop the run")
    except TrainingInterrupted as stopped:
        print(f"resume: {stopped}", flush=True)
    resumed = make_trainer(Trainer, interrupted, config, train, shards)
    resumed_at = resumed.step
    resumed.run()
    diffs = {}
    for name in ("train_loss", "val_loss"):
        expected, got = metric(reference.log.history, name), metric(resumed.log.history, name)
        if expected.keys() != got.keys():
            raise RuntimeError(f"the resumed run logged {name} at steps {sorted(got)}, the uninterrupted one at "
                               f"{sorted(expected)}")
        diffs[name] = max(abs(expected[s] - got[s]) for s in expected)
    return ResumeRun(recipe=recipe, steps=mode.resume_steps, sigterm_after_step=mode.sigterm_after,
                     resumed_at_step=resumed_at, dropout=config.dropout,
                     compared_rows=len(metric(reference.log.history, "train_loss")),
                     max_train_loss_diff=diffs["train_loss"], max_val_loss_diff=diffs["val_loss"])


@contextlib.contextmanager
def exact_fp32_matmuls() -> Iterator[None]:
    """No TF32 (the Trainer turns it on for CUDA): the cached and uncached paths must pick the same tokens,
    and TF32's rounding would flip near-ties between a random model's logits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def generation(mode: Mode, recipe: str, params: Params) -> Generation:
    """bench_generate's measurement on the profile's model (random weights: speed does not depend on them)."""
    config = GPTConfig.from_params(params.model, params.tokenizer.vocab_size)
    fresh_device_state(mode.device)
    torch.manual_seed(0)
    model = GPT(config).to(mode.device).eval()
    prompt = torch.randint(0, config.vocab_size, (config.block_size - mode.new_tokens,)).tolist()
    cases = []
    with exact_fp32_matmuls():
        for case, (strategy, seeds) in CASES.items():
            cached, uncached = decoding_speed(model, prompt, strategy, seeds, mode.new_tokens, mode.decode_repeats)
            cases.append(DecodingCase(case, cached, uncached, cached / uncached))
    return Generation(recipe, model.num_params(), config.block_size, mode.new_tokens, cases)


# --- the run ------------------------------------------------------------------------------------


def machine(mode: Mode, peak_flops: float) -> dict[str, str | int | float | None]:
    cuda = mode.device == "cuda"
    return {"device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "peak_flops": peak_flops}


class Check:
    """Runs the phases in order, timing them and rewriting the JSON after each."""

    def __init__(self, out: Path, report: Report):
        self.out, self.report = out, report
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        self.report.elapsed_s = round(self.elapsed(), 1)
        write_record(self.out, self.report)

    def phase(self, name: str, run: Callable[[], None]) -> None:
        print(f"\n== {name} (at {self.elapsed():.0f} s)", flush=True)
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - one phase's failure must not cost the other phases' figures
            traceback.print_exc()
            self.report.errors[name] = f"{type(exc).__name__}: {exc}"
        self.write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny profile, eager, a few steps: every phase")
    parser.add_argument("--out", type=Path, help="the JSON to write (default: $OUT/gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds after which no further micro-batch of phase 5 is started (default 420)")
    args = parser.parse_args()
    if args.out is None and not os.environ.get("OUT"):
        raise PipelineError("no output path: pass --out PATH.json (the GPU machine sets $OUT, and the default "
                            "is $OUT/gpu_check.json)")
    out = args.out or Path(os.environ["OUT"]) / "gpu_check.json"
    mode = DRY if args.dry else GPU
    if mode.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("no CUDA GPU is visible. Fix: run it on a lent GPU machine (docs/gpus.md), or pass "
                            "--dry for the CPU dry run")

    params = {recipe: compose_params(recipe, mode.profile) for recipe in RECIPES}
    first = params[RECIPES[0]]
    report = Report(mode=mode.name, command="python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
                    machine=machine(mode, first.train.peak_flops))
    check = Check(out, report)
    check.write()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        workdir = Path(tmp)
        shards = synthetic_shards(workdir / "shards", first.tokenizer.vocab_size, mode, first.shards.shard_tokens)

        def cuda_tests_phase() -> None:
            report.cuda_tests = cuda_tests(mode)

        def train_phase() -> None:
            for recipe in RECIPES:
                report.train[recipe] = [train_run(mode, workdir, recipe, params[recipe], shards)]

        def resume_phase() -> None:
            report.resume = [resume_run(mode, workdir, recipe, params[recipe], shards) for recipe in RECIPES]
            report.max_resume_loss_diff = max(max(r.max_train_loss_diff, r.max_val_loss_diff) for r in report.resume)

        def generate_phase() -> None:
            report.generate = [generation(mode, recipe, params[recipe]) for recipe in RECIPES]

        def micro_batch_phase() -> None:
            for recipe, runs in report.train.items():
                for micro in mode.micro_batches:
                    if micro == runs[0].micro_batch_size:
                        continue
                    if check.elapsed() + runs[0].wall_s > args.budget_s:  # the profile's run: as long as this one
                        print(f"micro_batch: {recipe} at {micro} skipped: {check.elapsed():.0f} s + "
                              f"{runs[0].wall_s:.0f} s would pass the {args.budget_s:.0f} s budget", flush=True)
                        report.skipped_micro_batches.setdefault(recipe, []).append(micro)
                        continue
                    runs.append(train_run(mode, workdir, recipe, params[recipe], shards, micro))
                    check.write()
                report.best_micro_batch[recipe] = max(runs, key=lambda r: r.tokens_per_s).micro_batch_size

        for name, run in (("cuda_tests", cuda_tests_phase), ("train", train_phase), ("resume", resume_phase),
                          ("generate", generate_phase), ("micro_batch", micro_batch_phase)):
            check.phase(name, run)
    report.complete = True
    check.write()
    print_summary(report, out)
    failed_tests = report.cuda_tests.failed if report.cuda_tests else 0
    if report.errors or failed_tests:
        sys.exit(1)


def print_summary(report: Report, out: Path) -> None:
    print(f"\n== summary ({report.machine['device']}, {report.elapsed_s:.0f} s) -> {out}")
    if report.cuda_tests:
        t = report.cuda_tests
        print(f"cuda tests: {t.passed} passed, {t.failed} failed, {t.skipped} skipped {t.failures or ''}")
    for recipe, runs in report.train.items():
        for r in runs:
            memory = f"{r.peak_memory_gb:.1f} GB" if r.peak_memory_gb is not None else "n/a"
            print(f"train {recipe} micro {r.micro_batch_size} x {r.grad_accum_steps}: {r.tokens_per_s:,.0f} tok/s | "
                  f"mfu {r.mfu:.1%} (target {report.mfu_target:.0%}) | peak {memory} | compile {r.compile_s:.1f} s")
    print(f"best micro-batch: {report.best_micro_batch} (skipped for time: {report.skipped_micro_batches})")
    for r in report.resume:
        print(f"resume {r.recipe}: SIGTERM after step {r.sigterm_after_step}, resumed at step {r.resumed_at_step}: "
              f"largest difference train loss {r.max_train_loss_diff:.3g}, val loss {r.max_val_loss_diff:.3g}")
    for g in report.generate:
        for c in g.cases:
            print(f"generate {g.recipe}, {c.case}: KV cache {c.cached_tokens_per_s:,.0f} tok/s | no cache "
                  f"{c.uncached_tokens_per_s:,.0f} tok/s | {c.speedup:.1f}x")
    for name, error in report.errors.items():
        print(f"ERROR in {name}: {error}")


if __name__ == "__main__":
    run_stage(main)
