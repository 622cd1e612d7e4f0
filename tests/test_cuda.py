"""The CUDA paths, proven on a GPU: marked `cuda` and skipped where none is visible (CI); the CPU variants
of the same checks run everywhere. tests/conftest.py hides every GPU from the suite (its expected
numbers are the CPU's), so benchmarks/gpu_check.py runs this file without it on a lent GPU:
`python -m pytest --noconftest -m cuda -n 0 tests/test_cuda.py` (hence no conftest fixture here).

Comparisons in fp32 switch TF32 off (the Trainer turns it on for CUDA): its 10-bit mantissa would
swamp the 1e-4 tolerances.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from test_config import compose_params
from tinylm.config import Params, parse_params
from tinylm.evaluate import token_nll, untrained_model
from tinylm.generation.sampling import Greedy, Sample, decode
from tinylm.model import GPT, GPTConfig
from tinylm.training.checkpoint import read_checkpoint
from tinylm.training.optimizers import Optimizers
from tinylm.training.trainer import TrainingInterrupted
from trainer_helpers import (CONFIG, RESUME_PARAMS, VAL, after_step, assert_same_history, logged, make_trainer, params,
                             replace, run)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml"))
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=CUDA_MARKS)]


def cuda_only(test):
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


@pytest.fixture
def exact_fp32():
    """Call it (after building any Trainer) to switch TF32 off; the flags come back after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def switch_off() -> None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    yield switch_off
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def tiny_recipes() -> dict[str, Params]:
    """Each recipe composed over the tiny profile, as `dvc exp run -S recipe=R -S profile=tiny` would."""
    return {recipe: parse_params(compose_params(REPO, [f"recipe={recipe}", "profile=tiny"])) for recipe in RECIPES}


def recipe_config(params: Params) -> GPTConfig:
    return GPTConfig.from_params(params.model, params.tokenizer.vocab_size)


# --- precision --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_steps_train_fp32_master_weights_without_a_scaler(tmp_path, device):
    trainer = make_trainer(tmp_path, params(device=device, precision="bf16", max_steps=12))
    with trainer.autocast():
        assert torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
    result = trainer.run()
    assert not trainer.scaler.is_enabled()  # bf16 has fp32's exponent range: nothing to scale
    assert all(p.dtype == torch.float32 and p.device.type == device for p in result.model.parameters())
    losses = logged(tmp_path, "train_loss")
    assert all(math.isfinite(v) for v in losses.values()) and losses[11] < losses[0]


@cuda_only
def test_fp16_steps_use_the_grad_scaler_and_skip_a_step_that_overflows(tmp_path):
    trainer = make_trainer(tmp_path, params(device="cuda", precision="fp16", max_steps=20))
    assert trainer.scaler.is_enabled()
    losses = [trainer.train_step().loss for _ in range(10)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    # A loss scale of 2^60 makes the fp16 backward overflow: the scaler must skip the update and halve
    # its scale, and the trainer must not call that a divergence.
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.scaler.update(2.0 ** 60)
    stats = trainer.train_step()
    assert math.isfinite(stats.loss) and not math.isfinite(stats.grad_norm)
    assert trainer.scaler.get_scale() == 2.0 ** 59
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.model.parameters()))


# --- optimizers ---------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_cuda_optimizer_steps_equal_the_cpu_steps_on_the_same_grads(tmp_path, optimizer, exact_fp32):
    """Fused AdamW (and Muon, whose Newton-Schulz runs in bf16, hence its looser tolerance) on CUDA against
    the CPU optimizers, stepped in lockstep with the gradients of the CUDA run."""
    trainer = make_trainer(tmp_path, params(device="cuda", optimizer=optimizer))
    exact_fp32()
    assert trainer.optimizer.adamw.defaults["fused"]
    cpu_model = copy.deepcopy(trainer.model).cpu()
    cpu_optimizer = Optimizers(cpu_model, trainer.params, "cpu")
    initial = [p.detach().clone() for p in cpu_model.parameters()]
    for _ in range(3):  # the later steps start from non-zero moments
        stats = trainer.train_step()
        for cpu_param, param in zip(cpu_model.parameters(), trainer.model.parameters()):
            cpu_param.grad = param.grad.cpu()  # clipped: what the CUDA optimizers stepped with
        cpu_optimizer.set_lr(stats.lr)
        cpu_optimizer.step(torch.amp.GradScaler("cpu", enabled=False))
    # Muon: bf16 rounding differs between the CPU's and the GPU's matmuls (bf16 against fp32 Newton-Schulz
    # moves these weights by ~1e-3 in 3 steps; a wrong update by more than the steps' 3e-2).
    tolerance = {"adamw": dict(atol=1e-6, rtol=1e-5), "muon": dict(atol=2e-3, rtol=0.0)}[optimizer]
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(cpu_model.parameters(), initial))
    assert moved > 4 * tolerance["atol"]  # the steps are big enough for the comparison to mean something
    for cpu_param, param in zip(cpu_model.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(param.detach().cpu(), cpu_param.detach(), **tolerance)


# --- resume -------------------------------------------------------------------------------------


@cuda_only
def test_a_resume_restores_the_cuda_rng_state_and_continues_identically(tmp_path, monkeypatch):
    # Dropout on: its masks come from the CUDA generator, so a resume that lost its state would differ.
    config = dataclasses.replace(CONFIG, dropout=0.1)
    cuda_params = replace(RESUME_PARAMS, device="cuda")
    run(tmp_path / "uninterrupted", cuda_params, config)
    after_step(monkeypatch, 9, lambda trainer: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "resumed", cuda_params, config)
    monkeypatch.undo()
    saved = read_checkpoint(tmp_path / "resumed" / "ckpt" / "last.pt")["rng"][0]["cuda"]
    trainer = make_trainer(tmp_path / "resumed", cuda_params, config)
    assert trainer.step == 11 and torch.equal(torch.cuda.get_rng_state(trainer.device), saved)
    trainer.run()
    assert_same_history(tmp_path / "uninterrupted", tmp_path / "resumed")


# --- decoding and evaluation ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_kv_cache_decoding_equals_the_full_forward(tiny_recipes, recipe, device, exact_fp32):
    exact_fp32()
    config = recipe_config(tiny_recipes[recipe])
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    idx = torch.randint(0, config.vocab_size, (3, config.block_size), device=device)
    with torch.no_grad():
        full = model(idx).logits
        cache, start = model.new_kv_cache(3), 0
        for size in (config.block_size // 2, 1, 3, config.block_size // 2 - 4):
            step = model(idx[:, start:start + size], kv_cache=cache).logits
            torch.testing.assert_close(step, full[:, start:start + size], atol=1e-4, rtol=1e-4)
            start += size
    prompt = idx[0, :5].tolist()
    for strategy in (Greedy(), Sample(temperature=0.9, top_k=20)):
        # 2 x block_size new tokens: the window slides and the cache is rebuilt on the way.
        cached, recomputed = (decode(model, prompt, strategy, 2 * config.block_size, None, seeds=[0, 1],
                                     use_cache=use_cache) for use_cache in (True, False))
        assert [g.tokens for g in cached] == [g.tokens for g in recomputed]


@cuda_only
def test_evaluation_on_cuda_equals_the_cpu_in_fp32(tmp_path, exact_fp32):
    trainers = {device: make_trainer(tmp_path / device, params(device=device)) for device in ("cpu", "cuda")}
    exact_fp32()
    cpu_loss, cuda_loss = (trainers[device].evaluate() for device in ("cpu", "cuda"))
    assert abs(cuda_loss - cpu_loss) <= 1e-4
    # The evaluate_ppl stage's scoring: every target's NLL, windows sliding by half a block.
    cpu_nll, cuda_nll = (token_nll(untrained_model(CONFIG, 0, torch.device(device)), VAL[0], CONFIG.block_size // 2,
                                   batch_size=8) for device in ("cpu", "cuda"))
    assert abs(cuda_nll - cpu_nll).max() <= 1e-4


# --- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_traces_into_one_graph(tiny_recipes, recipe):
    """What torch.compile captures (TorchDynamo, the same on every backend): no graph break, which would
    cut the compiled step into pieces run one after another from Python."""
    config = recipe_config(tiny_recipes[recipe])
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(GPT(config))(idx, idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@cuda_only
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # raised inside torch._dynamo
def test_torch_compile_of_every_recipe_trains_as_eager_does(tmp_path, tiny_recipes, recipe):
    recipe_params = tiny_recipes[recipe]
    train = dataclasses.replace(recipe_params.train, device="cuda", sample_interval=0)
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        trainer = make_trainer(tmp_path / str(compiled), replace(train, compile=compiled), recipe_config(recipe_params))
        losses[compiled] = [trainer.train_step().loss for _ in range(4)]
    assert isinstance(trainer.module, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.precision == "bf16"  # both recipes: bf16 autocast on CUDA
    # Kernels fused differently round differently in bf16; a wrong graph would be off by far more.
    torch.testing.assert_close(losses[True], losses[False], atol=2e-2, rtol=0.0)
