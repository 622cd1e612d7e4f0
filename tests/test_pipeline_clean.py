"""End to end through DVC: `dvc repro clean` offline in a fresh copy of the repository."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import copy_repo, run_cmd


@pytest.mark.slow
def test_repro_clean_then_nothing_then_only_clean(tmp_path):
    repo = copy_repo(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["max_train_stories"] = 400
    params["data"]["max_val_stories"] = 100
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    first = run_cmd(["dvc", "repro", "clean"], repo)
    assert "Running stage 'download'" in first and "Running stage 'clean'" in first
    report = json.loads((repo / "reports/clean.json").read_text())
    assert report["train"]["stories_in"] == 400 and report["val"]["stories_in"] == 100
    provenance = json.loads((repo / "data/raw/provenance.json").read_text())
    assert provenance["source"] == "../shared/data/tinystories"

    second = run_cmd(["dvc", "repro", "clean"], repo)
    assert "Running stage" not in second

    params["clean"]["min_chars"] = 1000
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run_cmd(["dvc", "repro", "clean"], repo)
    assert "Running stage 'clean'" in third and "Running stage 'download'" not in third
    assert json.loads((repo / "reports/clean.json").read_text())["train"]["dropped"]["too_short"] > 0

    metrics = run_cmd(["dvc", "metrics", "show"], repo)
    assert "reports/clean.json" in metrics and "stories_out" in metrics
