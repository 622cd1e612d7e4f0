"""The pretraining loop: AdamW with warmup + cosine lr, gradient accumulation, mixed precision,
DDP, dvclive metrics, and checkpoints that resume a run exactly where it stopped.

One optimizer step, in this order (tests pin it):
  1. zero the grads;
  2. for each of N micro-batches: draw (x, y), forward under autocast, scale the loss by 1/N,
     backward (under DDP the grads are all-reduced only on the last micro-batch);
  3. clip the global grad norm to train.grad_clip and record the norm (taken before clipping);
  4. set this step's lr (linear warmup, then cosine decay to train.min_lr);
  5. optimizer step; 6. increment the step.

Steps are numbered by how many updates came before them: the row logged at step s holds the loss
of the forward of update s (the model after s updates), the lr that update used, and its grad
norm; val loss at step s scores the model after s updates, so step 0 is the untrained baseline.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_norm_

from tinylm.training.batches import TokenWindows, TrainBatches, validation_batches
from tinylm.training.checkpoint import (fingerprint, fingerprint_inputs, hash_tokens, load_checkpoint, remove_stale_temp_files, save_checkpoint)
from tinylm.config import TrainParams
from tinylm.training.metrics_log import MetricLog
from tinylm.model import GPT, GPTConfig
from tinylm.training.runtime import Distributed, autocast, process_group, resolve_device, resolve_precision
from tinylm.errors import PipelineError


class TrainingInterrupted(PipelineError):
    """SIGINT or SIGTERM: a checkpoint was saved and the run stops; running again continues it."""


class TrainingDiverged(PipelineError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def lr_at(step: int, train: TrainParams) -> float:
    """Linear warmup to train.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (train.lr - train.min_lr)


def make_optimizer(model: GPT, train: TrainParams, device_type: str) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (>= 2-D: linear weights, embeddings), not biases or LayerNorms."""
    params = list(model.parameters())  # a tied tensor appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2),
                             fused=device_type == "cuda")


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 per weight that multiplies (every non-embedding
    weight plus the tied head) plus attention scores and mixing, 12 * n_layer * d_model * block_size."""
    c = model.config
    matmul_weights = model.num_params(include_embeddings=False) + c.vocab_size * c.d_model
    return 6 * matmul_weights + 12 * c.n_layer * c.d_model * c.block_size


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


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
    is_main: bool


class Trainer:
    def __init__(self, config: GPTConfig, params: TrainParams, train_tokens: list[np.ndarray],
                 val_tokens: list[np.ndarray], *, checkpoint_path: str | Path, log_dir: str | Path,
                 tokenizer_fingerprint: str, distributed: Distributed = Distributed()):
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
        self.optimizer = make_optimizer(self.model, params, self.device.type)
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

        self.fingerprint_inputs = fingerprint_inputs(
            config, params, device_type=self.device.type, precision=self.precision,
            world_size=distributed.world_size, tokenizer_fingerprint=tokenizer_fingerprint,
            data_hashes={"train": hash_tokens(train_tokens), "val": hash_tokens(val_tokens)})
        self.step = 0
        self.tokens = 0
        self.elapsed_before = 0.0
        history = self._resume()

        self.ddp = None
        if distributed.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        module = self.ddp or self.model
        self.module = torch.compile(module) if params.compile else module
        self.log = MetricLog(log_dir, history, enabled=distributed.is_main)
        self._stop_signal: int | None = None
        self._started = time.perf_counter()

    # --- checkpoints -----------------------------------------------------------------------------

    def _resume(self) -> list[dict[str, Any]]:
        """Load this run's checkpoint if there is one; returns the metric history to continue."""
        state = None
        if self.dist.is_main:
            remove_stale_temp_files(self.checkpoint_path)
            state = load_checkpoint(self.checkpoint_path, self.fingerprint_inputs)
        if self.dist.world_size > 1:  # rank 0 reads it, so nodes need no shared filesystem
            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        if state is None:
            return []
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state(state["batches"])
        rng = state["rng"][self.dist.rank]
        torch.set_rng_state(rng["cpu"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        if self.dist.is_main:
            print(f"checkpoint: resuming {self.checkpoint_path} at step {self.step}", flush=True)
        return state["history"]

    def save_checkpoint(self) -> None:
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rng_per_rank = [rng]
        if self.dist.world_size > 1:
            rng_per_rank = [None] * self.dist.world_size
            dist.all_gather_object(rng_per_rank, rng)
        if not self.dist.is_main:
            return
        save_checkpoint(self.checkpoint_path, {
            "fingerprint": fingerprint(self.fingerprint_inputs), "fingerprint_inputs": self.fingerprint_inputs,
            "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "batches": self.batches.state(), "rng": rng_per_rank,
            "history": self.log.history,
        })

    # --- one step, evaluation --------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device.type, self.precision)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def train_step(self) -> StepStats:
        step = self.step
        self.optimizer.zero_grad(set_to_none=True)
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
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm_(self.model.parameters(), self.params.grad_clip)
        # One small all-reduce: the mean loss over ranks, and whether any rank got a stop signal
        # (all ranks must stop after the same step, or the next collective would hang).
        shared = torch.stack([loss_sum, torch.tensor(float(self._stop_signal is not None), device=self.device)])
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
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
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

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM ask for a checkpoint after the current step; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.dist.is_main:
                print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                      "(send it again to stop at once)", flush=True)

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _log_validation(self) -> float:
        val_loss = self.evaluate()
        self.log.write(self.step, val_loss=val_loss)
        if self.dist.is_main:
            print(f"step {self.step:>6}/{self.params.max_steps} | val loss {val_loss:.4f}", flush=True)
        return val_loss

    def run(self) -> TrainResult:
        p = self.params
        if self.dist.is_main:
            print(f"model: {self.model.num_params():,} parameters ({self.model.num_params(False):,} without "
                  f"embeddings) | {self.device.type} {self.precision} | {self.dist.world_size} process(es) | "
                  f"batch {self.batch_tokens:,} tokens ({p.micro_batch_size} x {p.grad_accum_steps} accumulation "
                  f"x {self.dist.world_size} ranks x {self.model.config.block_size}) | from step {self.step}",
                  flush=True)
        self.log.summary(batch_tokens=self.batch_tokens, params=self.model.num_params(),
                         params_without_embeddings=self.model.num_params(False))
        self.model.train()
        window_time, window_steps, last_train_loss = 0.0, 0, None
        with self._stop_on_signals():
            while self.step < p.max_steps:
                if self.step % p.eval_interval == 0:
                    self._log_validation()
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
        self.log.finish()
        return TrainResult(self.model, self.step, self.tokens, last_train_loss, val_loss, self.dist.is_main)

    def _log_train(self, stats: StepStats, window_time: float, window_steps: int) -> None:
        tokens_per_s = self.batch_tokens * window_steps / window_time
        mfu = self.flops_per_token * tokens_per_s / (self.params.peak_flops * self.dist.world_size)
        metrics = {"train_loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens": self.tokens,
                   "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed_s": self.elapsed()}
        if self.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.log.write(stats.step, **metrics)
        if self.dist.is_main:
            eta = (self.params.max_steps - self.step) * window_time / window_steps
            print(f"step {stats.step:>6}/{self.params.max_steps} | loss {stats.loss:.4f} | lr {stats.lr:.2e} | "
                  f"grad norm {stats.grad_norm:.2f} | {tokens_per_s:,.0f} tok/s | mfu {mfu:.1%} | "
                  f"elapsed {format_duration(self.elapsed())} | eta {format_duration(eta)}", flush=True)


def train(config: GPTConfig, params: TrainParams, train_tokens: list[np.ndarray], val_tokens: list[np.ndarray],
          *, checkpoint_path: str | Path, log_dir: str | Path, tokenizer_fingerprint: str) -> TrainResult:
    """Train (or resume) under torchrun when its env vars are set, else as one process."""
    distributed = Distributed.from_env()
    with process_group(distributed, resolve_device(params.device, distributed.local_rank)):
        trainer = Trainer(config, params, train_tokens, val_tokens, checkpoint_path=checkpoint_path,
                          log_dir=log_dir, tokenizer_fingerprint=tokenizer_fingerprint, distributed=distributed)
        return trainer.run()
