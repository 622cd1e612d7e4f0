"""`tinylm compare` end to end, in a temporary git + DVC repository on the tiny profile: a seed sweep
queued with DVC's sweep syntax, grouped into configs with the runs' own metrics; the figure's values;
the paired evaluation; runs made in two clones meeting through a git and a DVC remote; bad input."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from conftest import commit, copy_repo, run_cmd, run_queue, tiny_copy
from test_workflow import hub_unreachable  # noqa: F401 (autouse: the hub refuses at once, as offline)

pytestmark = pytest.mark.slow
EVAL = "reports/eval.json"
VAL_LOSS = "reports/train/plots/metrics/val_loss.tsv"


def tinylm(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed command, as a user runs it in the repository."""
    return subprocess.run([str(Path(sys.executable).parent / "tinylm"), *args], cwd=repo, capture_output=True,
                          text=True, timeout=600)


def experiments(repo: Path) -> dict[str, dict]:
    """name -> {rev, seed, lr} of every experiment `dvc exp show --all-commits` lists."""
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json", "--all-commits"], repo))
    out = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            rev = exp["revs"][0]
            train = rev["data"]["params"]["params.yaml"]["data"]["train"]
            out[exp["name"]] = {"rev": rev["rev"], "seed": train["seed"], "lr": train["lr"]}
    return out


def at(repo: Path, rev: str, path: str) -> str:
    return run_cmd(["git", "show", f"{rev}:{path}"], repo)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """The tiny pipeline up to evaluate_ppl committed, then 3 seeds x 2 learning rates queued with the sweep
    syntax and run."""
    repo = tiny_copy(tmp_path_factory.mktemp("compare"))
    run_cmd(["dvc", "repro", "evaluate_ppl"], repo)
    commit(repo, "reproduced")
    # -S composes params.yaml from conf/ again (Hydra), so the profile is named, as a user would.
    run_cmd(["dvc", "exp", "run", "--queue", "-S", "profile=tiny", "-S", "train.seed=range(1,4)", "-S",
             "train.lr=1e-3,2e-3", "evaluate_ppl"], repo)
    status = run_queue(repo, workers=2)
    assert status.count("Success") == 6, status
    return repo


def test_the_sweep_makes_two_groups_of_three_with_the_runs_own_metrics(swept):
    done = tinylm(swept, "compare", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    exps = experiments(swept)
    assert len(exps) == 6
    by_lr = {}
    for name, exp in exps.items():
        by_lr.setdefault(exp["lr"], []).append(json.loads(at(swept, exp["rev"], EVAL))["val_bpb"])
    threes = [g for g in report["groups"] if g["metric"]["n"] == 3]
    assert len(threes) == 2
    for group in threes:
        lr = 1e-3 if "train.lr=0.001" in group["label"] else 2e-3
        assert group["label"].startswith("recipe=modern profile=tiny, train.lr=")
        assert group["metric"]["mean"] == pytest.approx(np.mean(by_lr[lr]), abs=1e-12)
        assert group["metric"]["sd"] == pytest.approx(np.std(by_lr[lr], ddof=1), abs=1e-12)
        assert sorted(group["seeds"]) == [1, 2, 3]
    # The committed run is the default baseline (the workspace's params), one seed: no verdict.
    base = next(g for g in report["groups"] if g["baseline"])
    assert base["metric"]["n"] == 1 and base["label"] == "recipe=modern profile=tiny"
    assert all(g["note"].startswith("n = 1 on a side") for g in threes)
    assert report["unfinished"] == []


def test_against_a_repeated_baseline_the_verdict_is_welchs(swept):
    exps = experiments(swept)
    low = next(name for name, e in exps.items() if e["lr"] == 1e-3)
    done = tinylm(swept, "compare", "--baseline", low, "--md")
    assert done.returncode == 0, done.stderr
    values = {lr: [json.loads(at(swept, e["rev"], EVAL))["val_bpb"] for e in exps.values() if e["lr"] == lr]
              for lr in (1e-3, 2e-3)}
    expected = scipy_stats.ttest_ind(values[2e-3], values[1e-3], equal_var=False)
    row = next(line for line in done.stdout.splitlines() if "train.lr=0.002" in line and "±" in line)
    assert f"{expected.pvalue:.3g}" in row
    assert f"{np.mean(values[2e-3]) - np.mean(values[1e-3]):+.4f}" in row
    verdict = ("no detectable difference at 5%" if expected.pvalue >= 0.05
               else "better" if expected.statistic < 0 else "worse")
    assert verdict in row
    assert "(baseline)" in next(line for line in done.stdout.splitlines() if "train.lr=0.001" in line)


def test_the_noise_floor_file_takes_the_groups_and_adds_them_to_what_it_holds(swept, tmp_path):
    floor = tmp_path / "noise_floor.json"
    assert tinylm(swept, "compare", "--write-noise-floor", str(floor)).returncode == 0
    entries = json.loads(floor.read_text())["recipes"]
    assert len(entries) == 2  # the two groups of three; the committed run alone is no noise floor
    for entry in entries:
        assert sorted(entry["seeds"].values()) == [1, 2, 3] and entry["n"] == 3
        assert entry["mean"] == pytest.approx(np.mean(list(entry["runs"].values())), abs=1e-12)
    # What another clone recorded earlier: a seed-9 run, and a run of seed 1 that this clone's replaces.
    kept = entries[0]
    kept["runs"].update({"elsewhere": 5.0, "old-seed-1": 7.0})
    kept["seeds"].update({"elsewhere": 9, "old-seed-1": 1})
    floor.write_text(json.dumps({"recipes": entries}))
    assert tinylm(swept, "compare", "--write-noise-floor", str(floor)).returncode == 0
    grown = next(e for e in json.loads(floor.read_text())["recipes"] if e["params"] == kept["params"])
    assert sorted(grown["seeds"].values()) == [1, 2, 3, 9] and "old-seed-1" not in grown["runs"]
    assert grown["n"] == 4 and grown["sd"] == pytest.approx(np.std(list(grown["runs"].values()), ddof=1))


def test_the_plot_draws_each_groups_mean_and_ci_and_its_val_loss_band(swept, tmp_path):
    png = tmp_path / "compare.png"
    done = tinylm(swept, "compare", "--plot", str(png))
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from tinylm.experiments import groups as grouping
    from tinylm.experiments.plot import figure, read_curves
    from tinylm.experiments.runs import collect, declared_params, frame, group_key

    declared = declared_params(swept / "dvc.yaml")
    runs = collect(swept)
    table = frame(runs, declared)
    baseline = grouping.choose_baseline(table, None, group_key(runs[0].params, declared))
    groups = grouping.summarise(table, "reports/eval.json:val_bpb", baseline, [],
                                grouping.compositions(swept / "conf", declared))
    revs = dict(zip(table["name"], table["rev"]))
    fig = figure(groups, "val_bpb", read_curves(swept, revs))
    bars, lines = fig.axes
    points = bars.lines[0].get_xdata()
    assert list(points) == pytest.approx([g.metric.mean for g in groups])
    for group, line in zip(groups, lines.lines):
        tsvs = [pd.read_csv(__import__("io").StringIO(at(swept, revs[name], VAL_LOSS)), sep="\t")
                for name in group.runs]
        expected = np.mean([t["val_loss"].to_numpy() for t in tsvs], axis=0)
        assert line.get_xdata() == pytest.approx(tsvs[0]["step"].to_numpy())
        assert line.get_ydata() == pytest.approx(expected)


def test_paired_evaluation_scores_both_models_on_the_same_stories(swept):
    exps = experiments(swept)
    a = next(name for name, e in exps.items() if e["lr"] == 1e-3 and e["seed"] == 1)
    b = next(name for name, e in exps.items() if e["lr"] == 2e-3 and e["seed"] == 1)
    done = tinylm(swept, "compare", "--paired", a, b, "--resamples", "500")
    assert done.returncode == 0, done.stderr
    bpb = {name: json.loads(at(swept, exps[name]["rev"], EVAL))["val_bpb"] for name in (a, b)}
    first, second, third = done.stdout.splitlines()
    # Story by story, the scores add up to evaluate_ppl's bits per byte of each model (but for the first
    # story's first token, which evaluate_ppl cannot score and the paired stream does).
    shown = dict(re.findall(r"(\S+) (\d\.\d{4})", first.split("bpb ", 1)[1]))
    assert float(shown[a]) == pytest.approx(bpb[a], abs=2e-4) and float(shown[b]) == pytest.approx(bpb[b], abs=2e-4)
    low, high = map(float, re.search(r"95% CI \[([-+.\d]+), ([-+.\d]+)\]", second).groups())
    diff = float(re.search(r"bits/byte", second) and second.split(": ", 1)[1].split(" ")[0])
    assert diff == pytest.approx(float(shown[a]) - float(shown[b]), abs=2e-4) and low <= diff <= high
    assert "Evaluation noise only" in third


def test_runs_made_in_two_clones_meet_through_the_remotes(swept, tmp_path):
    bare, storage = tmp_path / "origin.git", tmp_path / "dvc-remote"
    run_cmd(["git", "init", "-q", "--bare", str(bare)], tmp_path)
    run_cmd(["dvc", "remote", "add", "-d", "-f", "shared", str(storage)], swept)
    commit(swept, "dvc remote")
    run_cmd(["git", "remote", "add", "origin", str(bare)], swept)
    run_cmd(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], swept)
    run_cmd(["dvc", "push"], swept)
    other = swept.parent / "other"  # beside repo/, so ../shared resolves
    run_cmd(["git", "clone", "-q", "-b", "main", str(bare), str(other)], tmp_path)
    run_cmd(["dvc", "pull", "--with-deps", "evaluate_ppl"], other)  # what the swept runs need (no export ran)
    run_cmd(["dvc", "exp", "run", "-n", "from-other", "-S", "profile=tiny", "-S", "train.seed=7", "-S", "train.lr=1e-3",
             "evaluate_ppl"], other)
    run_cmd(["dvc", "exp", "push", "origin", "from-other"], other)
    run_cmd(["dvc", "exp", "pull", "origin", "from-other"], swept)
    report = json.loads(tinylm(swept, "compare", "--json").stdout)
    low = next(g for g in report["groups"] if "train.lr=0.001" in g["label"])
    assert low["metric"]["n"] == 4 and "from-other" in low["runs"] and 7 in low["seeds"]
    exps = experiments(swept)
    values = [json.loads(at(swept, e["rev"], EVAL))["val_bpb"] for e in exps.values() if e["lr"] == 1e-3]
    assert low["metric"]["mean"] == pytest.approx(np.mean(values), abs=1e-12)


def test_bad_input_is_one_line_and_exit_2(swept, tmp_path):
    def fails(repo: Path, *args: str, says: str) -> None:
        done = tinylm(repo, "compare", *args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and says in done.stderr and "Traceback" not in done.stderr, done.stderr

    fails(swept, "no-such-rev", says="unknown Git revision 'no-such-rev'")
    fails(swept, "--baseline", "nothing-like-it", says="--baseline nothing-like-it: no run is called that")
    fails(swept, "--metric", "val_bpbb", says="--metric val_bpbb: no run has it")
    fails(copy_repo(tmp_path / "empty"), says="no experiments to compare")
    # A metric the workspace's run lacks: one line naming the run.
    eval_json = swept / EVAL
    original = eval_json.read_text()
    try:
        eval_json.write_text(json.dumps({k: v for k, v in json.loads(original).items() if k != "val_bpb"}))
        fails(swept, says="metric reports/eval.json:val_bpb is missing in run(s) workspace")
    finally:
        eval_json.write_text(original)
    assert math.isfinite(json.loads(eval_json.read_text())["val_bpb"])
