"""What a training run prints, and the throughput figure it reports: model FLOPs utilization (MFU).

Three kinds of line, printed by one process per node (local rank 0) alone:
  model: 27,936 parameters (25,472 without embeddings) | cpu fp32 | 1 process(es) | batch ... | from step 0
  step     10/12 | val loss 3.8365
  step     10/12 | loss 3.8387 | lr 6.16e-04 | grad norm 1.57 | 14,895 tok/s | mfu 0.3% | elapsed 0m01s | eta 0m00s

MFU is the share of the hardware's peak FLOP/s that the model's own arithmetic would need at the
measured speed (recomputation for activation checkpointing does not count), so it compares runs
across batch sizes, precisions and machines.
"""
from __future__ import annotations

from tinylm.config import TrainParams
from tinylm.model import GPT


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 per weight that multiplies (every non-embedding
    weight, and the head, which a tied model counts among the embeddings) plus attention scores and
    mixing, 12 * n_layer * d_model * block_size."""
    c = model.config
    tied_head = c.vocab_size * c.d_model if c.tie_embeddings else 0
    matmul_weights = model.num_params(include_embeddings=False) + tied_head
    return 6 * matmul_weights + 12 * c.n_layer * c.d_model * c.block_size


def model_flops_utilization(flops_per_token: float, tokens_per_s: float, peak_flops: float,
                            world_size: int) -> float:
    """The FLOP/s the model needs at `tokens_per_s` (all ranks together) over the peak of all ranks'
    devices, each `peak_flops` (train.peak_flops)."""
    return flops_per_token * tokens_per_s / (peak_flops * world_size)


def format_duration(seconds: float) -> str:
    """`7m05s` below an hour, `2h03m` from one hour on (seconds no longer matter then)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Console:
    """The run's lines on stdout; `enabled` is False on every rank but local rank 0, which then print nothing."""

    def __init__(self, train: TrainParams, enabled: bool):
        self.train = train
        self.enabled = enabled

    def _print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)  # flushed: stage logs are read while the run goes on

    def startup(self, model: GPT, *, device_type: str, precision: str, world_size: int, batch_tokens: int,
                step: int) -> None:
        """The model size, where the numbers run, how a step's batch is made up, and the first step."""
        t = self.train
        self._print(f"model: {model.num_params():,} parameters ({model.num_params(False):,} without "
                    f"embeddings) | {device_type} {precision} | {world_size} process(es) | "
                    f"batch {batch_tokens:,} tokens ({t.micro_batch_size} x {t.grad_accum_steps} accumulation "
                    f"x {world_size} ranks x {model.config.block_size}) | from step {step}")

    def validation(self, step: int, val_loss: float) -> None:
        self._print(f"step {step:>6}/{self.train.max_steps} | val loss {val_loss:.4f}")

    def train_step(self, step: int, *, loss: float, lr: float, grad_norm: float, tokens_per_s: float, mfu: float,
                   elapsed_s: float, window_s: float, window_steps: int) -> None:
        """Update `step`'s numbers; the ETA assumes the steps after it go as fast as the last
        `window_steps`, which took `window_s` seconds."""
        eta = (self.train.max_steps - (step + 1)) * window_s / window_steps
        self._print(f"step {step:>6}/{self.train.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                    f"grad norm {grad_norm:.2f} | {tokens_per_s:,.0f} tok/s | mfu {mfu:.1%} | "
                    f"elapsed {format_duration(elapsed_s)} | eta {format_duration(eta)}")
