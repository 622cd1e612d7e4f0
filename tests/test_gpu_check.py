"""benchmarks/gpu_check.py in its CPU dry mode (tiny profile, eager, a few steps, every phase): the script a
lent GPU runs is known to work, and to write every figure, before any GPU time is spent on it."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = "benchmarks/gpu_check.py"


def run_check(repo_root, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=repo_root, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def report(repo_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    done = run_check(repo_root, "--dry", "--out", str(out))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def recipes(repo_root) -> list[str]:
    return sorted(p.stem for p in (repo_root / "conf" / "recipe").glob("*.yaml"))


def test_the_dry_run_completes_every_phase(report):
    assert report["complete"] and report["errors"] == {} and report["mode"] == "dry"
    assert report["machine"]["device"].startswith("cpu") and report["mfu_target"] == 0.4


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the cuda tests run instead of skipping")
def test_the_cuda_tests_phase_collects_them_and_they_skip_without_a_gpu(report):
    tests = report["cuda_tests"]
    assert tests["skipped"] >= 10 and tests["passed"] == 0 and tests["failed"] == 0 and tests["failures"] == []


def test_every_recipe_is_trained_at_every_micro_batch_with_sane_figures(report, recipes):
    assert sorted(report["train"]) == recipes and report["skipped_micro_batches"] == {}
    for recipe, runs in report["train"].items():
        assert sorted(r["micro_batch_size"] for r in runs) == [2, 4]
        assert runs[0]["micro_batch_size"] == 4  # the profile's own split comes first
        best = max(runs, key=lambda r: r["tokens_per_s"])
        assert report["best_micro_batch"][recipe] == best["micro_batch_size"]
        for run in runs:
            assert run["micro_batch_size"] * run["grad_accum_steps"] == 4 and run["batch_tokens"] == 4 * 64
            assert run["timed_steps"] == 3 and not run["compiled"] and run["peak_memory_gb"] is None
            assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1 and run["compile_s"] >= 0
            assert math.isclose(run["tokens_per_s"] * run["step_ms"] / 1e3, run["batch_tokens"], rel_tol=1e-6)
            assert all(math.isfinite(run[k]) for k in ("first_loss", "last_loss", "val_loss"))
            assert run["wall_s"] > run["step_ms"] * run["timed_steps"] / 1e3
    assert {r["precision"] for r in report["train"]["modern"]} == {"bf16"}  # the recipe's bf16 autocast
    assert {r["precision"] for r in report["train"]["baseline"]} == {"fp32"}  # auto: fp32 on the CPU


def test_a_sigterm_and_resume_reproduce_the_uninterrupted_losses(report, recipes):
    assert [r["recipe"] for r in report["resume"]] == recipes
    for run in report["resume"]:
        # The signal lands after update 3, the run stops after the next one: the checkpoint holds step 5.
        assert (run["sigterm_after_step"], run["resumed_at_step"], run["compared_rows"]) == (3, 5, run["steps"])
        assert run["dropout"] > 0 and run["max_train_loss_diff"] <= 1e-6 and run["max_val_loss_diff"] <= 1e-6
    assert report["max_resume_loss_diff"] <= 1e-6


def test_generation_is_measured_with_and_without_the_kv_cache(report, recipes):
    assert [g["recipe"] for g in report["generate"]] == recipes
    for generation in report["generate"]:
        assert (generation["context"], generation["new_tokens"]) == (64, 16)
        assert [c["case"] for c in generation["cases"]] == ["greedy, 1 sequence", "sampling, 5 sequences"]
        for case in generation["cases"]:
            assert case["cached_tokens_per_s"] > 0 and case["uncached_tokens_per_s"] > 0
            assert math.isclose(case["speedup"], case["cached_tokens_per_s"] / case["uncached_tokens_per_s"])


def test_without_an_output_path_it_says_so_in_one_line(repo_root):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = run_check(repo_root, "--dry", env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: no output path: pass --out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without a GPU")
def test_the_full_check_without_a_gpu_points_to_the_dry_run_and_writes_nothing(repo_root, tmp_path):
    out = tmp_path / "gpu_check.json"
    done = run_check(repo_root, "--out", str(out))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--dry" in done.stderr
    assert not out.exists()
