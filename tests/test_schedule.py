"""The lr schedule's floor is a fraction of each optimizer's peak (train.min_lr_ratio), whatever train.lr is,
and both committed recipes keep the schedule they had when the floor was an absolute train.min_lr."""
from __future__ import annotations

import math

import pytest

from test_config import compose_params
from tinylm.config import parse_params
from tinylm.training.trainer import lr_at


def old_lr_at(step: int, train, min_lr: float) -> float:
    """The schedule before min_lr_ratio, verbatim: cosine decay to an absolute min_lr."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (train.lr - min_lr)


def muon_lr(adamw_lr: float, train) -> float:
    return adamw_lr * train.muon_lr / train.lr  # what Optimizers.set_lr gives Muon


@pytest.mark.parametrize("recipe, lr, old_min_lr, muon_peak", [
    ("baseline", 1e-3, 1e-4, None),  # val bpb 1.1674
    ("modern", 4e-3, 4e-4, 0.02),  # the default, val bpb 0.9055
])
def test_both_recipes_keep_their_schedule_to_the_last_bit(repo_root, recipe, lr, old_min_lr, muon_peak):
    train = parse_params(compose_params(repo_root, [f"recipe={recipe}"])).train
    assert (train.lr, train.min_lr_ratio) == (lr, 0.1)
    if muon_peak is not None:
        assert (train.optimizer, train.muon_lr) == ("muon", muon_peak)
    for step in range(train.max_steps + 1):
        new, old = lr_at(step, train), old_lr_at(step, train, old_min_lr)
        assert new == old, (step, new, old)  # ==, not approx: the same floats train the same weights
        assert muon_lr(new, train) == muon_lr(old, train)


def test_a_lower_lr_decays_both_optimizers_to_a_tenth_of_their_peaks(repo_root):
    # The README's `dvc exp run -S train.lr=6e-4` on the modern default: with the floor an absolute 4e-4,
    # AdamW went from 6e-4 to 4e-4 and Muon to 2/3 of its peak.
    train = parse_params(compose_params(repo_root, ["train.lr=6e-4"])).train
    assert train.optimizer == "muon"
    end = lr_at(train.max_steps, train)
    assert end == pytest.approx(0.1 * 6e-4, rel=1e-12)
    assert muon_lr(end, train) == pytest.approx(0.1 * train.muon_lr, rel=1e-12)
    peak = lr_at(train.warmup_steps, train)
    assert (peak, muon_lr(peak, train)) == pytest.approx((6e-4, train.muon_lr))


def test_the_floor_must_be_a_fraction(repo_root):
    raw = compose_params(repo_root, ["train.min_lr_ratio=1.5"])
    with pytest.raises(ValueError, match=r"train\.min_lr_ratio: must be in \[0, 1\]"):
        parse_params(raw)
