"""The pretraining loop: AdamW (or Muon beside it) with warmup + cosine lr, gradient accumulation,
mixed precision and DDP; validation every train.eval_interval steps, metrics every
train.log_interval, stories sampled at milestones (train.sample_interval), and a checkpoint every
train.checkpoint_interval, at the end, and when a signal asks the run to stop.

The `Trainer` owns the optimizer step, evaluation and the loop; the pieces it drives live beside it:
batches.py (what each step trains on), optimizers.py (AdamW, or Muon for the hidden matrices),
checkpoint.py (what a checkpoint holds, saving and resuming it), metrics_log.py (the metric rows and
dvclive), milestones.py (the stories sampled as it learns), progress.py (the console lines and MFU),
interrupt.py (SIGINT/SIGTERM), runtime.py (device, precision, DDP process group).

One optimizer step, in this order (tests pin it):
  1. zero the grads;
  2. for each of N micro-batches: draw (x, y), forward under autocast, scale the loss by 1/N,
     backward (under DDP the grads are all-reduced only on the last micro-batch);
  3. clip the global grad norm to train.grad_clip and record the norm (taken before clipping);
  4. set this step's lr (linear warmup, then cosine decay to train.min_lr_ratio x train.lr);
  5. optimizer step; 6. increment the step.

Steps are numbered by how many updates came before them: the row logged at step s holds the loss
of the forward of update s (the model after s updates), the lr that update used, and its grad
norm; val loss at step s scores the model after s updates, so step 0 is the untrained baseline.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_norm_

from tinylm.training.batches import TokenWindows, TrainBatches, validation_batches
from tinylm.training.checkpoint import Position, check_ranks_agree, fingerprint_inputs, hash_tokens
from tinylm.config import TrainParams
from tinylm.training.interrupt import StopSignals
from tinylm.training.metrics_log import MetricLog
from tinylm.training.milestones import SAMPLES_FILE, MilestoneCheckpoint, MilestoneSamples
from tinylm.training.optimizers import Optimizers
from tinylm.model import GPT, GPTConfig
from tinylm.tokenizer.bpe import Tokenizer
from tinylm.training.progress import Console, flops_per_token, model_flops_utilization
from tinylm.training.runtime import Distributed, autocast, process_group, resolve_device, resolve_precision
from tinylm.errors import PipelineError


class TrainingInterrupted(PipelineError):
    """SIGINT or SIGTERM: a checkpoint was saved and the run stops; running again continues it."""


class TrainingDiverged(PipelineError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def lr_at(step: int, train: TrainParams) -> float:
    """Linear warmup to train.lr over warmup_steps, then cosine decay to min_lr_ratio x lr at max_steps.

    Muon's lr is this x muon_lr / lr (optimizers.py), so it decays to the same fraction of its own peak."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    min_lr = train.lr * train.min_lr_ratio  # the floor first, then the old formula: the same floats as before
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (train.lr - min_lr)


@dataclass
class StepStats:
    step: int  # index of the update just made
    loss: float
    grad_norm: float
    lr: float
    stop_requested: bool


@dataclass
class TrainResult:
    model: GPT
    steps: int
    tokens: int
    train_loss: float | None
    val_loss: float
    writes_outputs: bool  # this process writes its node's outputs (Distributed.writes_outputs)


class Trainer:
    def __init__(self, config: GPTConfig, params: TrainParams, train_tokens: list[np.ndarray],
                 val_tokens: list[np.ndarray], *, checkpoint_path: str | Path, log_dir: str | Path,
                 tokenizer_fingerprint: str, distributed: Distributed = Distributed(),
                 tokenizer: Tokenizer | None = None):
        """`tokenizer` decodes the stories sampled at milestones (train.sample_interval); without one,
        none are sampled."""
        self.params = params
        self.dist = distributed
        self.device = resolve_device(params.device, distributed.local_rank)
        bf16_ok = self.device.type == "cpu" or torch.cuda.is_bf16_supported()
        self.precision = resolve_precision(params.precision, self.device.type, bf16_ok)
        if self.device.type == "cuda":
            # fp32 matmuls (precision fp32, or ops autocast keeps in fp32) may use TF32 tensor cores.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.checkpoint_path = Path(checkpoint_path)

        torch.manual_seed(params.seed)  # the same initial weights on every rank
        self.model = GPT(config).to(self.device)
        self.model.activation_checkpointing = params.activation_checkpointing
        torch.manual_seed(params.seed + distributed.rank)  # dropout differs across ranks
        self.optimizer = Optimizers(self.model, params, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        train_windows = TokenWindows(train_tokens, config.block_size, "train")
        self.batches = TrainBatches(train_windows, params.seed, params.micro_batch_size, params.grad_accum_steps,
                                    distributed.rank, distributed.world_size)
        val = validation_batches(TokenWindows(val_tokens, config.block_size, "val"), params.eval_batches,
                                 params.micro_batch_size)
        self.val_batches = val[distributed.rank::distributed.world_size]
        self.batch_tokens = (params.micro_batch_size * params.grad_accum_steps * distributed.world_size
                             * config.block_size)
        self.flops_per_token = flops_per_token(self.model)

        inputs = fingerprint_inputs(
            config, params, device_type=self.device.type, precision=self.precision,
            world_size=distributed.world_size, tokenizer_fingerprint=tokenizer_fingerprint,
            data_hashes={"train": hash_tokens(train_tokens), "val": hash_tokens(val_tokens)})
        check_ranks_agree(inputs, distributed)
        self.milestones = MilestoneSamples(params, tokenizer, Path(log_dir) / SAMPLES_FILE,
                                           enabled=distributed.writes_outputs)
        self.checkpoint = MilestoneCheckpoint(self.checkpoint_path, inputs, model=self.model,
                                              optimizer=self.optimizer, scaler=self.scaler, batches=self.batches,
                                              device=self.device, distributed=distributed,
                                              milestones=self.milestones)
        resumed = self.checkpoint.resume() or Position()
        self.step, self.tokens, self.elapsed_before = resumed.step, resumed.tokens, resumed.elapsed_s

        self.ddp = None
        if distributed.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        module = self.ddp or self.model
        self.module = torch.compile(module) if params.compile else module
        self.log = MetricLog(log_dir, resumed.history, enabled=distributed.writes_outputs)
        self.console = Console(params, enabled=distributed.writes_outputs)
        self.stop_signals = StopSignals(announce=distributed.writes_outputs)
        self._started = time.perf_counter()

    # --- one step, evaluation --------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device.type, self.precision)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def train_step(self) -> StepStats:
        step = self.step
        self.optimizer.zero_grad()
        micro_batches = self.batches.next_step()
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            with sync:
                with self.autocast():
                    loss = self.module(self._to_device(x), self._to_device(y)).loss / len(micro_batches)
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.optimizer.unscale(self.scaler)
        grad_norm = clip_grad_norm_(self.model.parameters(), self.params.grad_clip)
        # One small all-reduce: the mean loss over ranks, and whether any rank got a stop signal
        # (all ranks must stop after the same step, or the next collective would hang).
        shared = torch.stack([loss_sum, torch.tensor(float(self.stop_signals.requested), device=self.device)])
        if self.dist.world_size > 1:
            dist.all_reduce(shared)
        loss_total, stop_votes = shared.tolist()
        loss_value, grad_norm_value = loss_total / self.dist.world_size, grad_norm.item()
        # With fp16 an inf grad norm is the GradScaler's cue to skip the step and lower its scale.
        if not math.isfinite(loss_value) or (not math.isfinite(grad_norm_value) and not self.scaler.is_enabled()):
            raise TrainingDiverged(
                f"the loss is {loss_value} (grad norm {grad_norm_value}) at step {step}: training diverged. "
                f"The last good checkpoint {self.checkpoint_path} is kept. Fix: lower train.lr or raise "
                "train.warmup_steps in params.yaml.")
        lr = lr_at(step, self.params)
        self.optimizer.set_lr(lr)
        self.optimizer.step(self.scaler)
        self.step += 1
        self.tokens += self.batch_tokens
        return StepStats(step, loss_value, grad_norm_value, lr, stop_votes > 0)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches, in eval mode (no dropout); back to train mode after.

        Each rank scores its share of the batches with the bare model (no DDP wrapper, whose forward
        may run collectives that ranks with fewer batches would not join); one all-reduce sums them.
        """
        self.model.eval()
        total = torch.zeros(2, device=self.device)  # sum of batch losses, number of batches
        for x, y in self.val_batches:
            with self.autocast():
                total[0] += self.model(self._to_device(x), self._to_device(y)).loss.float()
            total[1] += 1
        if self.dist.world_size > 1:
            dist.all_reduce(total)
        self.model.train()
        return (total[0] / total[1]).item()

    # --- the loop --------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._started

    def save_checkpoint(self) -> None:
        """Collective under DDP: every rank calls it (local rank 0 of each node writes the file)."""
        self.checkpoint.save(Position(self.step, self.tokens, self.elapsed(), self.log.history))

    def _log_validation(self) -> float:
        val_loss = self.evaluate()
        self.log.write(self.step, val_loss=val_loss)
        self.console.validation(self.step, val_loss)
        return val_loss

    def _sample_milestone(self) -> None:
        # The bare model: the DDP wrapper's forward may run collectives the other ranks do not join,
        # and a compiled one would recompile for every decoding shape.
        self.milestones.record(self.model, self.step)

    def run(self) -> TrainResult:
        p = self.params
        self.console.startup(self.model, device_type=self.device.type, precision=self.precision,
                             world_size=self.dist.world_size, batch_tokens=self.batch_tokens, step=self.step)
        self.log.summary(batch_tokens=self.batch_tokens, params=self.model.num_params(),
                         params_without_embeddings=self.model.num_params(False))
        self.milestones.start()
        self.model.train()
        window_time, window_steps, last_train_loss = 0.0, 0, None
        with self.stop_signals:
            while self.step < p.max_steps:
                if self.step % p.eval_interval == 0:
                    self._log_validation()
                self._sample_milestone()
                started = time.perf_counter()
                stats = self.train_step()
                window_time += time.perf_counter() - started
                window_steps += 1
                last_train_loss = stats.loss
                if stats.step % p.log_interval == 0 or self.step == p.max_steps:
                    self._log_train(stats, window_time, window_steps)
                    window_time, window_steps = 0.0, 0
                if stats.stop_requested:
                    self.save_checkpoint()
                    raise TrainingInterrupted(
                        f"stopped by a signal after step {stats.step}; checkpoint saved to {self.checkpoint_path}. "
                        "Run the stage again (`dvc repro`) to continue from it.")
                # The last save makes a crash while the outputs are written cost no retraining.
                if self.step % p.checkpoint_interval == 0 or self.step == p.max_steps:
                    self.save_checkpoint()
            val_loss = self._log_validation()
            self._sample_milestone()
        self.log.finish()
        return TrainResult(self.model, self.step, self.tokens, last_train_loss, val_loss, self.dist.writes_outputs)

    def _log_train(self, stats: StepStats, window_time: float, window_steps: int) -> None:
        tokens_per_s = self.batch_tokens * window_steps / window_time
        mfu = model_flops_utilization(self.flops_per_token, tokens_per_s, self.params.peak_flops, self.dist.world_size)
        metrics = {"train_loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens": self.tokens,
                   "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed_s": self.elapsed()}
        if self.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.log.write(stats.step, **metrics)
        self.console.train_step(stats.step, loss=stats.loss, lr=stats.lr, grad_norm=stats.grad_norm,
                                tokens_per_s=tokens_per_s, mfu=mfu, elapsed_s=self.elapsed(), window_s=window_time,
                                window_steps=window_steps)


def train(config: GPTConfig, params: TrainParams, train_tokens: list[np.ndarray], val_tokens: list[np.ndarray],
          *, checkpoint_path: str | Path, log_dir: str | Path, tokenizer_fingerprint: str,
          tokenizer: Tokenizer | None = None) -> TrainResult:
    """Train (or resume) under torchrun when its env vars are set, else as one process."""
    distributed = Distributed.from_env()
    with process_group(distributed, resolve_device(params.device, distributed.local_rank)):
        trainer = Trainer(config, params, train_tokens, val_tokens, checkpoint_path=checkpoint_path,
                          log_dir=log_dir, tokenizer_fingerprint=tokenizer_fingerprint, distributed=distributed,
                          tokenizer=tokenizer)
        return trainer.run()
