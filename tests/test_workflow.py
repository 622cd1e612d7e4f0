"""The users' interface, for real, in a temporary git repository on the tiny profile:
dvc repro, dvc exp run, dvc metrics diff, dvc plots show/diff, the queue, push and pull, and that
DVC reruns exactly what changed: not less, and not more."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import commit, run_cmd, run_queue, tiny_copy

pytestmark = pytest.mark.slow
ALL_STAGES = ["download", "clean", "train_bpe", "encode_shards", "pretrain", "evaluate_ppl",
              "sample_sweep", "report", "export"]
FROM_PRETRAIN = ALL_STAGES[4:]
# Declared by no stage in dvc.yaml (tests/test_execution_only.py proves they change no output byte).
EXECUTION_ONLY = {("clean", "workers"): 1, ("tokenizer", "workers"): 2, ("shards", "workers"): 2,
                  ("train", "checkpoint_interval"): 7, ("train", "activation_checkpointing"): True}


@pytest.fixture(scope="module", autouse=True)
def hub_unreachable():
    """The hub refuses connections at once, as offline (and DVC's queue workers inherit it)."""
    previous = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
    yield
    if previous is None:
        del os.environ["HF_ENDPOINT"]
    else:
        os.environ["HF_ENDPOINT"] = previous


def data_hashes(lock: str) -> dict[str, str]:
    """md5 of every output under data/ recorded in a dvc.lock."""
    return {out["path"]: out["md5"] for stage in yaml.safe_load(lock)["stages"].values()
            for out in stage.get("outs", []) if out["path"].startswith("data/")}


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def back_to_baseline(repo: Path, *stages: str) -> None:
    """Undo an applied experiment: the committed params and lock, and the outputs of the stages (all of them
    unless named; name them where only some were reproduced, since the others' outputs are in no cache)."""
    run_cmd(["git", "checkout", "--", "."], repo)
    run_cmd(["dvc", "checkout", "--force", *stages], repo)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh copy of the project on the tiny profile, reproduced once and committed."""
    repo = tiny_copy(tmp_path_factory.mktemp("workflow"))
    output = run_cmd(["dvc", "repro"], repo)
    assert ran(output) == set(ALL_STAGES), output
    commit(repo, "reproduced")
    return repo


def test_repro_then_nothing_to_do(repo):
    assert ran(run_cmd(["dvc", "repro"], repo)) == set()
    assert "up to date" in run_cmd(["dvc", "status"], repo)


def test_execution_only_params_rerun_nothing(repo):
    original = (repo / "params.yaml").read_text()
    try:
        for (section, key), value in EXECUTION_ONLY.items():
            params = yaml.safe_load(original)
            assert params[section][key] != value
            params[section][key] = value
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            assert "up to date" in run_cmd(["dvc", "status"], repo), f"{section}.{key}"
        params = yaml.safe_load(original)
        params["train"]["compile"] = True  # declared: compiled kernels round differently
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert "pretrain" in run_cmd(["dvc", "status"], repo)
    finally:
        (repo / "params.yaml").write_text(original)


def test_editing_the_bpe_trainer_reruns_train_bpe_and_stops_where_outputs_are_identical(repo):
    trainer = repo / "tinylm/tokenizer/train.py"
    trainer.write_text(trainer.read_text().replace("BLOCK_CHARS = 1 << 20", "BLOCK_CHARS = 1 << 20  # a comment"))
    output = run_cmd(["dvc", "repro"], repo)
    # The tokenizer files come out identical, so encode_shards, pretrain and evaluation never rerun;
    # the report does when reports/tokenizer.json's training time changed (a timing, in a metric).
    assert "train_bpe" in ran(output), output
    assert ran(output) <= {"train_bpe", "report"}, output
    back_to_baseline(repo)
    assert "up to date" in run_cmd(["dvc", "status"], repo)


def test_report_links_only_existing_files(repo):
    report = (repo / "reports/report.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)\)", report)
    assert links, "the report links its figures"
    missing = [link for link in links if not link.startswith("http") and not (repo / "reports" / link).is_file()]
    assert missing == []


def test_metrics_show_lists_every_headline(repo):
    shown = run_cmd(["dvc", "metrics", "show"], repo)
    for key in ("val_ppl", "val_bpb", "val_loss", "stories_out"):
        assert key in shown


def test_exp_run_reruns_pretrain_and_after_only(repo):
    output = run_cmd(["dvc", "exp", "run", "-S", "profile=tiny", "-S", "train.lr=6e-4", "-n", "lr6e-4"], repo)
    assert ran(output) == set(FROM_PRETRAIN), output
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == pytest.approx(6e-4)

    diff = run_cmd(["dvc", "metrics", "diff"], repo)
    for key in ("val_ppl", "val_loss", "val_bpb"):
        assert key in diff, diff

    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], repo))
    names = {exp.get("name") for row in shown for exp in row.get("experiments") or []}
    assert "lr6e-4" in names

    check_plots_against_step(repo)
    run_cmd(["dvc", "plots", "show", "-o", "plots_show"], repo)
    run_cmd(["dvc", "plots", "diff", "HEAD", "-o", "plots_diff"], repo)
    for folder in ("plots_show", "plots_diff"):
        html = (repo / folder / "index.html").read_text()
        assert "loss" in html and "vegaEmbed" in html
        assert "cdn.jsdelivr" not in html  # the offline template inlines Vega


def check_plots_against_step(repo: Path) -> None:
    """Every training metric is drawn against the optimizer step of its rows, not the row number."""
    rendered = json.loads(run_cmd(["dvc", "plots", "show", "--json"], repo))["data"]
    max_steps = yaml.safe_load((repo / "params.yaml").read_text())["train"]["max_steps"]
    checked = 0
    for name, plots in rendered.items():
        if not name.startswith("reports/train/plots/metrics/"):
            continue
        with open(repo / name) as f:
            logged_steps = [int(line.split("\t")[0]) for line in f.readlines()[1:]]
        for plot in plots:
            spec = plot["content"]
            assert spec["encoding"]["x"]["field"] == "step", (name, spec["encoding"]["x"])
            values = spec["data"]["values"]
            assert [int(row["step"]) for row in values] == logged_steps, name
            assert max(logged_steps) > len(logged_steps) and max(logged_steps) <= max_steps, name
            checked += 1
    assert checked >= 6, rendered.keys()


def test_going_back_to_params_already_run_restores_from_the_run_cache(repo):
    # The workspace holds the lr=6e-4 experiment; put back only the baseline params.
    run_cmd(["git", "checkout", "--", "params.yaml"], repo)
    output = run_cmd(["dvc", "repro"], repo)
    for stage in ("pretrain", "evaluate_ppl"):  # no retraining, no re-evaluation
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in output, output
    # DVC's run-cache cannot restore plain `cache: false` outs (kept in git so that the report
    # renders on GitHub), so the two cheap stages that write them run again.
    assert ran(output) == {"sample_sweep", "report"}, output
    committed = run_cmd(["git", "show", "HEAD:reports/eval.json"], repo)
    assert json.loads((repo / "reports/eval.json").read_text()) == json.loads(committed)


def test_queued_experiments_that_rerun_download_succeed_in_parallel(repo):
    # Queued runs work in copies under .dvc/tmp/exps/, where ../shared would point inside .dvc:
    # local sources must resolve against the repository. The hub is unreachable (fixture above).
    back_to_baseline(repo)
    for stories in (200, 250):
        run_cmd(["dvc", "exp", "run", "--queue", "-S", "profile=tiny", "-S", f"data.max_train_stories={stories}",
                 "-n", f"q{stories}"], repo)
    status = run_queue(repo, workers=2)
    assert status.count("Success") == 2, status + run_cmd(["dvc", "queue", "logs", "q200"], repo)
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], repo))
    runs = {exp["name"]: exp["revs"][0]["data"] for row in shown for exp in row.get("experiments") or []}
    for stories in (200, 250):
        metrics = runs[f"q{stories}"]["metrics"]["reports/clean.json"]["data"]
        assert metrics["train"]["stories_in"] == stories  # download did rerun, from the offline copy


def test_push_then_pull_in_a_fresh_clone(repo, tmp_path):
    back_to_baseline(repo)
    run_cmd(["dvc", "remote", "add", "-d", "-f", "local", str(tmp_path / "remote")], repo)
    commit(repo, "remote")
    run_cmd(["dvc", "push"], repo)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    run_cmd(["dvc", "pull"], clone)
    assert "up to date" in run_cmd(["dvc", "status"], clone)
    assert ran(run_cmd(["dvc", "repro"], clone)) == set()
    assert (clone / "data/model/model.pt").read_bytes() == (repo / "data/model/model.pt").read_bytes()


def test_a_fresh_clone_reproduces_the_committed_data_hashes(repo):
    back_to_baseline(repo)
    clone = repo.parent / "fresh"  # beside repo/, so ../shared resolves as in the original
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    output = run_cmd(["dvc", "repro"], clone)
    # No cache, so every stage with a cached output runs again. Their outputs come out identical to
    # the committed lock, so evaluate_ppl and sample_sweep (deps unchanged, outputs in git) do not.
    assert ran(output) >= {"download", "clean", "train_bpe", "encode_shards", "pretrain", "export"}, output
    assert not ran(output) & {"evaluate_ppl", "sample_sweep"}, output
    committed = data_hashes(run_cmd(["git", "show", "HEAD:dvc.lock"], repo))
    assert set(committed) == {"data/raw", "data/clean", "data/tokenizer", "data/shards", "data/model",
                              "data/export/hf"}
    assert data_hashes((clone / "dvc.lock").read_text()) == committed
