"""dvc.yaml declares, for every stage, the code it runs: DVC reruns a stage exactly when it should."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

# Infrastructure every stage uses; declaring it would rerun the whole pipeline for a typo fix in
# an error message. Params themselves are declared per key.
INFRASTRUCTURE = {"tinylm/__init__.py", "tinylm/config.py", "tinylm/files.py", "tinylm/stage.py"}


def tinylm_imports(script: Path, root: Path) -> set[str]:
    """Every tinylm module the script imports, transitively, as repo-relative paths."""
    found: set[str] = set()
    todo = [script]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tinylm":
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.split(".")[0] == "tinylm"]
            for name in names:
                path = name.replace(".", "/") + ".py"
                if (root / path).is_file() and path not in found:
                    found.add(path)
                    todo.append(root / path)
    return found - INFRASTRUCTURE


@pytest.fixture(scope="module")
def stages(repo_root):
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


def test_every_stage_declares_the_code_it_runs(stages, repo_root):
    for name, stage in stages.items():
        script = f"stages/{name}.py"
        assert stage["cmd"] == f"python {script}"
        deps = set(stage["deps"])
        missing = tinylm_imports(repo_root / script, repo_root) - deps
        assert script in deps and not missing, f"{name}: add to its deps in dvc.yaml: {sorted(missing)}"


def test_stages_declare_only_their_own_params(stages):
    # Changing train.lr must never rerun the stages before pretrain.
    for name in ("download", "clean", "train_bpe", "encode_shards"):
        for key in stages[name].get("params", []):
            assert not str(key).startswith(("train", "model", "eval", "sample", "report")), (name, key)
