"""The console lines of a training run, durations, and the FLOPs and MFU they report."""
from __future__ import annotations

import pytest

from tinylm.model import GPT, GPTConfig
from tinylm.training.progress import Console, flops_per_token, format_duration, model_flops_utilization
from trainer_helpers import params

# Small enough to count by hand: no biases, one layer, one head.
TINY = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, d_model=8, dropout=0.0, bias=False)
# Non-embedding weights: ln_1 8 + qkv 8*24 + attention proj 8*8 + ln_2 8 + fc 8*32 + mlp proj 32*8 + ln_f 8.
TINY_NON_EMBEDDING = 8 + 192 + 64 + 8 + 256 + 256 + 8
TINY_EMBEDDINGS = 10 * 8 + 4 * 8  # token table (also the tied head), position table


@pytest.mark.parametrize("seconds, text", [(0, "0m00s"), (59.9, "0m59s"), (61, "1m01s"), (3599, "59m59s"),
                                           (3600, "1h00m"), (2 * 3600 + 3 * 60 + 59, "2h03m"),
                                           (100 * 3600, "100h00m")])
def test_durations_show_seconds_below_an_hour_and_minutes_from_one_on(seconds, text):
    assert format_duration(seconds) == text


def test_flops_and_mfu_match_a_hand_count():
    model = GPT(TINY)
    assert model.num_params(include_embeddings=False) == TINY_NON_EMBEDDING
    # 6 per matmul weight (non-embedding ones plus the tied 10 x 8 head), 12 * layers * d_model * block.
    per_token = 6 * (TINY_NON_EMBEDDING + 10 * 8) + 12 * 1 * 8 * 4
    assert per_token == 5616 and flops_per_token(model) == per_token
    # 1M tokens/s on two devices of 1 TFLOP/s each: 5.616 GFLOP/s of 2 TFLOP/s.
    assert model_flops_utilization(per_token, 1e6, 1e12, world_size=2) == pytest.approx(2.808e-3, rel=1e-12)


def test_console_lines(capsys):
    console = Console(params(micro_batch_size=4, grad_accum_steps=2, max_steps=3000), enabled=True)
    console.startup(GPT(TINY), device_type="cpu", precision="fp32", world_size=2, batch_tokens=64, step=5)
    console.validation(40, 2.1)
    # ETA: the 3000 - 42 steps after step 41 at 2 s per 4 steps.
    console.train_step(41, loss=2.34567, lr=3e-4, grad_norm=0.876, tokens_per_s=12345.6, mfu=0.0432,
                       elapsed_s=3725, window_s=2.0, window_steps=4)
    assert capsys.readouterr().out.splitlines() == [
        f"model: {TINY_NON_EMBEDDING + TINY_EMBEDDINGS} parameters ({TINY_NON_EMBEDDING} without embeddings) | "
        "cpu fp32 | 2 process(es) | batch 64 tokens (4 x 2 accumulation x 2 ranks x 4) | from step 5",
        "step     40/3000 | val loss 2.1000",
        "step     41/3000 | loss 2.3457 | lr 3.00e-04 | grad norm 0.88 | 12,346 tok/s | mfu 4.3% | "
        "elapsed 1h02m | eta 24m39s",
    ]


def test_console_of_other_ranks_prints_nothing(capsys):
    console = Console(params(), enabled=False)
    console.startup(GPT(TINY), device_type="cpu", precision="fp32", world_size=2, batch_tokens=64, step=0)
    console.validation(0, 4.0)
    console.train_step(0, loss=4.0, lr=1e-3, grad_norm=1.0, tokens_per_s=1.0, mfu=0.1, elapsed_s=1.0,
                       window_s=1.0, window_steps=1)
    assert capsys.readouterr().out == ""
