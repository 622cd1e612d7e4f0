"""Relative local sources resolve against the repository, also from DVC's temporary experiment copies."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from tinylm.config import parse_params
from tinylm.corpus.sources import resolve_source, workspace_root
from tinylm.errors import PipelineError


def data_params(sources: list):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"]["sources"] = sources
    return parse_params(raw).data


@pytest.mark.parametrize("copy", [".dvc/tmp/exps/tmpab12cd", ".dvc/tmp/exps/celery/tmpab12cd",
                                  ".dvc/tmp/exps/tmpab12cd/stages"])
def test_a_dvc_experiment_copy_resolves_to_the_repository_that_holds_it(tmp_path, copy):
    repo = tmp_path / "repo"
    assert workspace_root(repo / copy) == repo.resolve()


def test_the_repository_itself_is_its_own_root(tmp_path):
    assert workspace_root(tmp_path / "repo") == (tmp_path / "repo").resolve()
    # A folder merely named like DVC's, outside a .dvc/tmp, is not mistaken for a copy.
    assert workspace_root(tmp_path / "tmp/exps/x") == (tmp_path / "tmp/exps/x").resolve()


def make_layout(tmp_path: Path) -> tuple[Path, Path]:
    """repo/ with a DVC experiment copy inside, and a data folder beside repo/ (like ../shared)."""
    repo = tmp_path / "repo"
    copy = repo / ".dvc/tmp/exps/celery/tmpxyz"
    copy.mkdir(parents=True)
    data = tmp_path / "shared/data"
    data.mkdir(parents=True)
    (data / "train.txt").write_text("Once upon a time.\n<|endoftext|>\n")
    (data / "val.txt").write_text("The end.\n<|endoftext|>\n")
    return repo, copy


def test_relative_folder_source_from_an_experiment_copy(tmp_path):
    repo, copy = make_layout(tmp_path)
    source, skipped = resolve_source(data_params(["../shared/data"]), root=workspace_root(copy))
    assert skipped == [] and source.kind == "folder"
    assert source.folder == repo.resolve() / "../shared/data" and source.folder.is_dir()
    assert source.label == "../shared/data"  # provenance records what params say, wherever it runs


def test_relative_split_files_from_an_experiment_copy(tmp_path):
    repo, copy = make_layout(tmp_path)
    entry = {"train": "../shared/data/train.txt", "validation": "../shared/data/val.txt"}
    source, _ = resolve_source(data_params([entry]), root=workspace_root(copy))
    assert source.kind == "files"
    assert Path(source.files.train).read_text().startswith("Once upon a time")
    assert source.label == "train=../shared/data/train.txt validation=../shared/data/val.txt"


def test_a_missing_relative_folder_names_where_relative_paths_start(tmp_path):
    repo, copy = make_layout(tmp_path)
    with pytest.raises(PipelineError, match=f"relative paths start at {repo.resolve()}"):
        resolve_source(data_params(["../elsewhere"]), root=workspace_root(copy))

