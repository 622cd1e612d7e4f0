"""The users' interface, for real, in a temporary git repository on the tiny profile:
dvc repro, dvc exp run, dvc metrics diff, dvc plots show/diff, the queue, push and pull."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import copy_repo, run_cmd

pytestmark = pytest.mark.slow
ALL_STAGES = ["download", "clean", "train_bpe", "encode_shards", "pretrain", "evaluate_ppl",
              "sample_sweep", "report"]
FROM_PRETRAIN = ALL_STAGES[4:]


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def commit(repo: Path, message: str) -> None:
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], repo)


def back_to_baseline(repo: Path) -> None:
    """Undo an applied experiment: the committed params and lock, and their outputs."""
    run_cmd(["git", "checkout", "--", "."], repo)
    run_cmd(["dvc", "checkout", "--force"], repo)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh copy of the project on the tiny profile, reproduced once and committed."""
    repo = copy_repo(tmp_path_factory.mktemp("workflow"))
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base=None):
        tiny = OmegaConf.to_container(compose(config_name="config", overrides=["profile=tiny"]))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    commit(repo, "tiny profile")
    output = run_cmd(["dvc", "repro"], repo)
    assert ran(output) == set(ALL_STAGES), output
    commit(repo, "reproduced")
    return repo


def test_repro_then_nothing_to_do(repo):
    assert ran(run_cmd(["dvc", "repro"], repo)) == set()
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

    run_cmd(["dvc", "plots", "show", "-o", "plots_show"], repo)
    run_cmd(["dvc", "plots", "diff", "HEAD", "-o", "plots_diff"], repo)
    for folder in ("plots_show", "plots_diff"):
        html = (repo / folder / "index.html").read_text()
        assert "loss" in html and "vegaEmbed" in html
        assert "cdn.jsdelivr" not in html  # the offline template inlines Vega


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


def test_queue_runs_every_queued_experiment(repo):
    back_to_baseline(repo)
    for lr in ("2e-3", "3e-3"):
        run_cmd(["dvc", "exp", "run", "--queue", "-S", "profile=tiny", "-S", f"train.lr={lr}", "-n", f"q{lr}"], repo)
    run_cmd(["dvc", "queue", "start", "-j", "1"], repo)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run_cmd(["dvc", "queue", "status"], repo)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    shown = run_cmd(["dvc", "exp", "show", "--csv"], repo)
    assert "q2e-3" in shown and "q3e-3" in shown


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
