"""Muon (train.optimizer: muon): its update is an orthogonalised gradient, and the trainer runs it
as it runs AdamW: exact resume from a checkpoint, gradient accumulation equal to one big batch,
a falling loss, AdamW's schedule in the log."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tinylm.training.checkpoint import Position, load_checkpoint, save_checkpoint
from tinylm.training.optimizers import muon_matrices
from tinylm.training.trainer import lr_at
from trainer_helpers import CONFIG, logged, make_trainer, params, run

# The architecture Muon is usually paired with; untied, so the LM head is a matrix AdamW keeps.
MODERN = dataclasses.replace(CONFIG, positions="rope", norm="rmsnorm", tie_embeddings=False)
MUON = params(optimizer="muon")

# Five Newton-Schulz steps with torch's (Jordan's) coefficients do not converge to U V^T: they map
# every singular value that is not tiny into a band around 1, documented as roughly (0.5, 1.5)
# ("S' ~ Uniform(0.5, 1.5)", torch.optim._muon). Observed here: 0.68 to 1.20.
BAND = (0.5, 1.5)


def spread_gradient(n: int, seed: int) -> torch.Tensor:
    """A random n x n gradient whose singular values are spread log-uniformly over 0.1..10.

    Not a plain Gaussian matrix: a square one has a few singular values near 0 (the smallest ~1/n of
    the largest, often less), which 5 Newton-Schulz steps amplify by at most ~3.4445^5 ~ 500 after
    dividing by the Frobenius norm, so they stay below the band (a Gaussian 64 x 64 gave 0.17)."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    s = 10 ** (torch.rand(n, generator=generator) * 2 - 1)
    return u @ torch.diag(s) @ v.T


@pytest.mark.parametrize("seed", range(4))
def test_a_muon_update_has_singular_values_near_one_where_the_gradients_spread(seed):
    n = 32
    gradient = spread_gradient(n, seed)
    weight = torch.nn.Parameter(torch.randn(n, n, generator=torch.Generator().manual_seed(100 + seed)))
    before = weight.detach().clone()
    weight.grad = gradient.clone()
    # No momentum, no decay, lr 1 and a square matrix (the "original" adjustment is then x1):
    # the step is exactly the orthogonalised gradient.
    torch.optim.Muon([weight], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False,
                     adjust_lr_fn="original").step()
    update = before - weight.detach()
    raw = torch.linalg.svdvals(gradient)
    assert raw.max() / raw.min() > 30  # the gradient favours some directions by far...
    singular = torch.linalg.svdvals(update)
    assert BAND[0] <= singular.min() and singular.max() <= BAND[1], singular  # ...its update hardly does
    # The update keeps the gradient's singular directions (Newton-Schulz is an odd polynomial of G):
    # in the gradient's own bases it is diagonal, up to the iteration's bfloat16 rounding.
    u, _, vh = torch.linalg.svd(gradient)
    inner = u.T @ update @ vh.T
    assert (inner - torch.diag(torch.diagonal(inner))).abs().max() < 0.05
    assert (torch.diagonal(inner) > 0).all()  # and moves along them, not against them


def test_the_trainers_muon_step_orthogonalises_the_mlp_matrices(tmp_path):
    trainer = make_trainer(tmp_path, MUON, MODERN)
    matrices = muon_matrices(trainer.model)
    before = [p.detach().clone() for p in matrices]
    adamw_before = trainer.model.wte.weight.detach().clone()
    stats = trainer.train_step()
    muon_lr = stats.lr * MUON.muon_lr / MUON.lr  # Muon follows AdamW's schedule, scaled
    assert trainer.optimizer.muon.param_groups[0]["lr"] == pytest.approx(muon_lr)
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    for old, p in zip(before, matrices):
        rows, cols = p.shape
        # torch's "original" adjustment scales a tall matrix's step by sqrt(rows / cols).
        singular = torch.linalg.svdvals((old - p.detach()) / (muon_lr * math.sqrt(max(1, rows / cols))))
        assert singular.max() <= BAND[1], names[id(p)]  # no direction moves by more than ~lr
        # Every direction the gradient has moves by about lr, however small its share of the gradient:
        # Newton-Schulz lifts a singular value of 1% of the gradient's norm into the band. (Directions
        # far below that, as in the attention matrices at init, stay small: they are not asserted.)
        gradient = torch.linalg.svdvals(p.grad)
        present = int((gradient >= 0.01 * gradient.norm()).sum())
        assert present >= min(rows, cols) // 2 or ".attn." in names[id(p)], names[id(p)]  # the check has teeth
        assert singular[:present].min() >= BAND[0], names[id(p)]
    assert not torch.equal(adamw_before, trainer.model.wte.weight)  # AdamW moved the rest


def test_captured_muon_state_restored_into_a_fresh_trainer_takes_the_same_next_steps(tmp_path):
    """As test_trainer_resume's test of the same name, with Muon: its momentum buffers must travel."""
    trainer = make_trainer(tmp_path / "first", MUON, MODERN)
    for _ in range(3):
        trainer.train_step()
    position = Position(trainer.step, trainer.tokens, 1.5, [])
    state = trainer.checkpoint.capture(position)
    assert set(state["optimizer"]) == {"adamw", "muon"}
    muon_state = state["optimizer"]["muon"]["state"]
    assert len(muon_state) == len(muon_matrices(trainer.model))
    assert all(torch.count_nonzero(s["momentum_buffer"]) > 0 for s in muon_state.values())
    save_checkpoint(tmp_path / "saved.pt", state)  # through the file: the next step changes the live tensors
    expected = [trainer.train_step() for _ in range(2)]

    fresh = make_trainer(tmp_path / "fresh", MUON, MODERN)
    assert fresh.checkpoint.restore(load_checkpoint(tmp_path / "saved.pt", fresh.checkpoint.inputs)) == position
    fresh.step, fresh.tokens = position.step, position.tokens
    got = [fresh.train_step() for _ in range(2)]
    for a, b in zip(got, expected):
        assert (a.loss, a.grad_norm, a.lr) == (b.loss, b.grad_norm, b.lr)  # bitwise
    for (name, p), q in zip(trainer.model.named_parameters(), fresh.model.parameters()):
        assert torch.equal(p, q), name
    # Without Muon's state the next steps differ: the test above does depend on it.
    amnesiac = make_trainer(tmp_path / "amnesiac", MUON, MODERN)
    saved = load_checkpoint(tmp_path / "saved.pt", amnesiac.checkpoint.inputs)
    saved["optimizer"]["muon"] = amnesiac.optimizer.muon.state_dict()  # fresh, empty momentum
    amnesiac.checkpoint.restore(saved)
    amnesiac.step, amnesiac.tokens = position.step, position.tokens
    for _ in range(2):
        amnesiac.train_step()
    assert not torch.equal(amnesiac.model.blocks[0].mlp.fc.weight, trainer.model.blocks[0].mlp.fc.weight)


# As in test_trainer.py's AdamW test, but not to 1e-5: torch.optim.Muon orthogonalises in bfloat16,
# whose rounding (one ulp is 0.4%) turns the float32-level difference of a summed gradient into a
# slightly different update, and 6 steps compound it (measured 1.3e-3 in the log, 1.1e-3 in the weights).
def test_grad_accumulation_with_muon_equals_one_big_batch(tmp_path):
    tolerance = 5e-3
    big = run(tmp_path / "big", params(optimizer="muon", micro_batch_size=8, grad_accum_steps=1, max_steps=6), MODERN)
    accumulated = run(tmp_path / "acc", params(optimizer="muon", micro_batch_size=2, grad_accum_steps=4, max_steps=6),
                      MODERN)
    for name in ("train_loss", "grad_norm"):  # (val batches hold micro_batch_size rows, so they differ)
        a, b = logged(tmp_path / "big", name), logged(tmp_path / "acc", name)
        assert a.keys() == b.keys()
        assert max(abs(a[s] - b[s]) for s in a) < tolerance, name
    for (name, p), q in zip(big.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, atol=tolerance, rtol=1e-4, msg=name)


def test_muon_lowers_the_loss_and_logs_adamws_schedule(tmp_path):
    p = params(optimizer="muon", max_steps=40, eval_interval=10, log_interval=5, lr=1e-2, min_lr_ratio=0.1,
               muon_lr=0.05)
    result = run(tmp_path, p, MODERN)
    val = logged(tmp_path, "val_loss")
    assert val[0] == pytest.approx(math.log(CONFIG.vocab_size), abs=0.3)  # untrained: uniform guess
    assert val[40] < val[0] - 1.0 and result.val_loss == val[40]
    lrs = logged(tmp_path, "lr")
    assert lrs == pytest.approx({step: lr_at(step, p) for step in lrs})  # AdamW's lr, not Muon's
