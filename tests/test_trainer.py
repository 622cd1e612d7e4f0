"""The training step, its schedule and optimizer groups, precision choice, batches and evaluation."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tinylm.training.batches import TokenWindows, TrainBatches, validation_batches
from tinylm.model import GPT
from tinylm.errors import PipelineError
from tinylm.training.progress import flops_per_token
from tinylm.training.runtime import resolve_device, resolve_precision
from tinylm.training.optimizers import Optimizers, muon_matrices
from tinylm.training.trainer import lr_at
from trainer_helpers import CONFIG, logged, make_trainer, params, replace, run



def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    p = params(max_steps=110, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, p) for s in range(p.max_steps)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(p.max_steps, p) == pytest.approx(1e-4)
    assert min(lrs) >= 1e-4


def test_precision_choice():
    assert resolve_precision("auto", "cpu", True) == "fp32"
    assert resolve_precision("auto", "cuda", True) == "bf16"
    assert resolve_precision("auto", "cuda", False) == "fp16"
    assert resolve_precision("bf16", "cpu", True) == "bf16"
    assert resolve_precision("fp32", "cuda", True) == "fp32"
    with pytest.raises(PipelineError, match="fp16"):
        resolve_precision("fp16", "cpu", True)
    with pytest.raises(PipelineError, match="bf16"):
        resolve_precision("bf16", "cuda", False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_cuda_requested_without_gpu_is_a_clear_error():
    with pytest.raises(PipelineError, match="train.device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_weight_decay_only_on_matrices():
    model = GPT(CONFIG)
    optimizers = Optimizers(model, params(weight_decay=0.1), "cpu")
    assert optimizers.muon is None
    decayed, plain = optimizers.adamw.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert any(p is model.wte.weight for p in decayed["params"])  # the tied head/embedding, once
    grouped = [id(p) for g in optimizers.adamw.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(grouped) == len(set(grouped))
    assert optimizers.adamw.defaults["betas"] == (0.9, 0.95)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    config = dataclasses.replace(CONFIG, tie_embeddings=False, positions="rope", norm="rmsnorm", mlp="swiglu")
    model = GPT(config)
    optimizers = Optimizers(model, params(optimizer="muon", lr=1e-3, muon_lr=0.05, muon_weight_decay=0.01), "cpu")
    muon = [p for g in optimizers.muon.param_groups for p in g["params"]]
    adamw = [p for g in optimizers.adamw.param_groups for p in g["params"]]
    # Per block: the fused q/k/v and the output projection; the MLP's gate, fc and proj.
    assert len(muon) == 5 * config.n_layer and all(p.dim() == 2 for p in muon)
    assert {id(p) for p in muon} == {id(p) for p in muon_matrices(model)}
    assert {id(p) for p in adamw} == {id(p) for p in model.parameters()} - {id(p) for p in muon}
    assert any(p is model.wte.weight for p in adamw) and any(p is model.lm_head.weight for p in adamw)
    assert optimizers.muon.defaults["weight_decay"] == 0.01
    optimizers.set_lr(2e-4)  # the schedule's AdamW lr; Muon's is scaled by muon_lr / lr (0.05 / 1e-3)
    assert all(g["lr"] == 2e-4 for g in optimizers.adamw.param_groups)
    assert optimizers.muon.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_flops_per_token_counts_six_per_matmul_weight_plus_attention():
    model = GPT(CONFIG)
    c = CONFIG
    non_embedding = model.num_params(include_embeddings=False)
    assert flops_per_token(model) == 6 * (non_embedding + c.vocab_size * c.d_model) + 12 * c.n_layer * c.d_model * c.block_size


def test_windows_run_across_shards_and_targets_are_shifted_inputs():
    shards = [np.arange(10, dtype=np.uint16), np.arange(100, 103, dtype=np.uint16), np.arange(200, 208, dtype=np.uint16)]
    windows = TokenWindows(shards, block_size=4, split="train")
    assert windows.count == 10 + 3 + 8 - 4  # the split is its shards end to end
    x, y = windows.gather(np.arange(windows.count))
    assert x[0].tolist() == [0, 1, 2, 3] and y[0].tolist() == [1, 2, 3, 4]
    assert x[5].tolist() == [5, 6, 7, 8] and y[5].tolist() == [6, 7, 8, 9]
    assert x[8].tolist() == [8, 9, 100, 101] and y[8].tolist() == [9, 100, 101, 102]
    assert x[9].tolist() == [9, 100, 101, 102] and y[9].tolist() == [100, 101, 102, 200]  # spans all three
    assert x[-1].tolist() == [203, 204, 205, 206] and y[-1].tolist() == [204, 205, 206, 207]
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(PipelineError, match="block_size"):
        TokenWindows([np.arange(2, dtype=np.uint16), np.arange(2, dtype=np.uint16)], block_size=4, split="val")


def test_ranks_draw_disjoint_parts_of_one_global_batch_and_generator_state_replays():
    windows = TokenWindows([np.arange(5000, dtype=np.uint16)], block_size=8, split="train")
    single = TrainBatches(windows, seed=1, micro_batch_size=2, grad_accum_steps=4, rank=0, world_size=1)
    ranks = [TrainBatches(windows, seed=1, micro_batch_size=2, grad_accum_steps=2, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        everything = torch.cat([x for x, _ in single.next_step()])
        per_rank = [torch.cat([x for x, _ in batches.next_step()]) for batches in ranks]
        assert not torch.equal(per_rank[0], per_rank[1])
        assert torch.equal(torch.cat(per_rank), everything)
    saved = single.state()
    expected = single.next_step()
    single.load_state(saved)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single.next_step(), expected))


def test_validation_batches_are_fixed_and_spread_over_the_split():
    windows = TokenWindows([np.arange(1000, dtype=np.uint16)], block_size=8, split="val")
    first = validation_batches(windows, num_batches=3, batch_size=4)
    again = validation_batches(windows, num_batches=3, batch_size=4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    starts = torch.cat([x[:, 0] for x, _ in first]).tolist()
    assert starts[0] == 0 and starts[-1] == windows.count - 1 and starts == sorted(set(starts))


def test_step_order_clip_before_update_and_logged_lr_is_the_lr_used(tmp_path, monkeypatch):
    """Pins: zero grads -> backward -> clip (norm recorded) -> set lr -> optimizer step -> step += 1."""
    events = []
    original_clip = torch.nn.utils.clip_grad_norm_
    original_step = torch.optim.AdamW.step

    def spy_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        norm = original_clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        events.append(("clip", trainer.step, norm.item(), after.item()))
        return norm

    def spy_step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"]]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        events.append(("update", trainer.step, self.param_groups[0]["lr"], norm))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr("tinylm.training.trainer.clip_grad_norm_", spy_clip)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    p = params(max_steps=8, grad_clip=0.05, warmup_steps=2)  # a small clip so it bites
    trainer = make_trainer(tmp_path, p)
    trainer.run()
    assert [e[0] for e in events] == ["clip", "update"] * p.max_steps
    logged_lr, logged_norm = logged(tmp_path, "lr"), logged(tmp_path, "grad_norm")
    for step in range(p.max_steps):
        (_, clip_step, norm, clipped), (_, update_step, lr_used, norm_at_update) = events[2 * step:2 * step + 2]
        assert clip_step == update_step == step  # the counter moves only after the update
        assert norm > p.grad_clip and clipped == pytest.approx(p.grad_clip, rel=1e-4)
        assert norm_at_update == pytest.approx(p.grad_clip, rel=1e-4)  # the update saw clipped grads
        assert lr_used == logged_lr[step] == pytest.approx(lr_at(step, p))
        assert logged_norm[step] == pytest.approx(norm)  # the recorded norm is the pre-clip one


def test_evaluate_runs_in_eval_mode_without_grad_and_returns_to_train_mode(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, params(), config=dataclasses.replace(CONFIG, dropout=0.3))
    seen = []
    original = GPT.forward

    def spy(self, *args, **kwargs):
        seen.append((self.training, torch.is_grad_enabled()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", spy)
    trainer.model.train()
    first = trainer.evaluate()
    assert seen == [(False, False)] * len(trainer.val_batches)
    assert trainer.model.training
    assert trainer.evaluate() == first  # dropout is off, so the same batches score the same


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    big = run(tmp_path / "big", params(micro_batch_size=8, grad_accum_steps=1, max_steps=6))
    accumulated = run(tmp_path / "acc", params(micro_batch_size=2, grad_accum_steps=4, max_steps=6))
    for name in ("train_loss", "grad_norm"):  # (val batches hold micro_batch_size rows, so they differ)
        a, b = logged(tmp_path / "big", name), logged(tmp_path / "acc", name)
        assert a.keys() == b.keys()
        assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    for (name, p), q in zip(big.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_training_lowers_the_loss_and_logs_every_metric(tmp_path):
    p = params(max_steps=40, eval_interval=10, log_interval=5, lr=1e-2, min_lr_ratio=0.1)
    result = run(tmp_path, p)
    val = logged(tmp_path, "val_loss")
    assert sorted(val) == [0, 10, 20, 30, 40]
    assert val[0] == pytest.approx(math.log(CONFIG.vocab_size), abs=0.3)  # untrained: uniform guess
    assert val[40] < val[0] - 1.0 and result.val_loss == val[40]
    assert sorted(logged(tmp_path, "train_loss")) == [0, 5, 10, 15, 20, 25, 30, 35, 39]
    for name in ("tokens_per_s", "mfu", "elapsed_s", "tokens"):
        assert all(v > 0 for v in logged(tmp_path, name).values())
    assert logged(tmp_path, "tokens")[39] == result.tokens == 40 * 4 * CONFIG.block_size


def test_bf16_autocast_on_cpu_trains(tmp_path):
    run(tmp_path / "fp32", params(max_steps=6))
    bf16 = run(tmp_path / "bf16", params(max_steps=6, precision="bf16"))
    a, b = logged(tmp_path / "fp32", "train_loss"), logged(tmp_path / "bf16", "train_loss")
    assert all(math.isfinite(v) for v in b.values())
    assert max(abs(a[s] - b[s]) for s in a) < 0.1  # same run, lower precision
    assert a != b  # autocast was really on
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # raised inside torch._dynamo
def test_compile_and_activation_checkpointing_options_keep_the_math(tmp_path):
    plain = run(tmp_path / "plain", params(max_steps=3, warmup_steps=1))
    lean = run(tmp_path / "lean", params(max_steps=3, warmup_steps=1, activation_checkpointing=True))
    for p, q in zip(plain.model.parameters(), lean.model.parameters()):
        torch.testing.assert_close(p, q)
    trainer = make_trainer(tmp_path / "compiled", replace(params(max_steps=3, warmup_steps=1), compile=True))
    assert trainer.module is not trainer.model and trainer.module._orig_mod is trainer.model
