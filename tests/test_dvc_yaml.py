"""dvc.yaml declares, for every stage, exactly the code it runs and the params that change its outputs,
so DVC reruns a stage when (and only when) one of them changes."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

# Run by every stage, yet never a dependency (dvc.yaml's header says why): config only parses and
# validates params.yaml, whose values DVC tracks key by key; errors only words messages.
NOT_DEPENDENCIES = {"tinylm/config.py", "tinylm/errors.py"}
# Knobs that change how a stage runs but no byte it writes (tests/test_execution_only.py proves it).
EXECUTION_ONLY = {"clean.workers", "tokenizer.workers", "shards.workers", "train.checkpoint_interval",
                  "train.activation_checkpointing"}
# pretrain runs its script through its launcher, itself or under torchrun (after validating params.yaml);
# the others with plain python.
LAUNCHERS = {"pretrain": "python -m tinylm.training.launch "}


def commands(stage: dict) -> list[str]:
    return stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]


def templated_params(stage: dict) -> set[str]:
    """The params interpolated into a stage's cmd (`${train.nnodes}`). dvc.lock records the resolved cmd, so
    changing one reruns the stage as a declared param would."""
    return {key for command in commands(stage) for key in re.findall(r"\$\{([\w.]+)\}", command)}


def module_path(name: str, root: Path) -> str | None:
    """`tinylm.corpus.formats` -> `tinylm/corpus/formats.py` if that file exists."""
    path = name.replace(".", "/") + ".py"
    return path if (root / path).is_file() else None


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
            for path in filter(None, (module_path(name, root) for name in names)):
                if path not in found:
                    found.add(path)
                    todo.append(root / path)
    return found


def expected_code(name: str, root: Path) -> set[str]:
    script = f"stages/{name}.py"
    return {script} | {p for p in tinylm_imports(root / script, root)
                       if p not in NOT_DEPENDENCIES and not p.endswith("__init__.py")}


@pytest.fixture(scope="module")
def stages(repo_root):
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


def test_every_stage_declares_exactly_the_code_it_runs(stages, repo_root):
    for name, stage in stages.items():
        script = commands(stage)[-1]
        assert script.startswith(LAUNCHERS.get(name, "python ")) and script.endswith(f" -m stages.{name}"), script
        declared = {dep for dep in stage["deps"] if dep.endswith(".py")}
        expected = expected_code(name, repo_root)
        assert declared == expected, (f"{name}: add to its deps in dvc.yaml {sorted(expected - declared)}, "
                                      f"remove {sorted(declared - expected)}")


def test_the_import_walk_sees_submodules_and_package_imports(repo_root):
    # The walk must follow `from tinylm.report import figures` and `from tinylm.corpus.formats import x`.
    imports = tinylm_imports(repo_root / "stages/report.py", repo_root)
    assert {"tinylm/report/figures.py", "tinylm/corpus/formats.py", "tinylm/tokenizer/bpe.py"} <= imports


def test_encoding_never_runs_training_or_source_code(stages):
    # A BPE trainer edit reruns train_bpe only; a hub-probing edit reruns download only.
    for name, stage in stages.items():
        if name != "train_bpe":
            assert "tinylm/tokenizer/train.py" not in stage["deps"], name
        if name != "download":
            assert "tinylm/corpus/sources.py" not in stage["deps"], name


def test_packages_are_empty_so_importing_one_module_runs_no_other(repo_root):
    for init in (repo_root / "tinylm").rglob("__init__.py"):
        assert init.read_text() == "", f"{init} must stay empty (a re-export would add every stage a dependency)"


def test_stages_declare_only_their_own_params(stages):
    # Changing train.lr must never rerun the stages before pretrain.
    for name in ("download", "clean", "train_bpe", "encode_shards"):
        for key in stages[name].get("params", []):
            assert not str(key).startswith(("train", "model", "eval", "sample", "report")), (name, key)


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys |= leaf_keys(value, f"{dotted}.") if isinstance(value, dict) else {dotted}
    return keys


def test_every_param_is_declared_by_a_stage_or_is_execution_only(stages, repo_root):
    params = leaf_keys(yaml.safe_load((repo_root / "params.yaml").read_text()))
    declared: set[str] = set()
    for stage in stages.values():
        for key in [*stage.get("params", []), *templated_params(stage)]:
            declared |= {p for p in params if p == key or p.startswith(f"{key}.")}
    assert EXECUTION_ONLY <= params
    assert not declared & EXECUTION_ONLY, f"execution-only params declared: {sorted(declared & EXECUTION_ONLY)}"
    untracked = params - declared - EXECUTION_ONLY
    assert not untracked, f"params no stage declares (DVC would not rerun on a change): {sorted(untracked)}"


def test_pretrain_launches_with_the_launch_params_only_through_its_cmd(stages, repo_root):
    params = leaf_keys(yaml.safe_load((repo_root / "params.yaml").read_text()))
    launch = {"train.nproc_per_node", "train.nnodes", "train.rdzv_endpoint"}
    assert templated_params(stages["pretrain"]) == launch <= params
    # Listing them under params: too would only record each twice in dvc.lock.
    assert not launch & set(stages["pretrain"]["params"])


def test_a_stage_imports_the_tinylm_of_the_checkout_it_runs_in(tmp_path):
    """A queued experiment runs in a copy of the repository under .dvc/tmp/exps/: its stages must import that
    copy's tinylm, not the workspace's editable install (which may have been edited since it was queued)."""
    import sys

    from conftest import copy_repo, run_cmd

    copy = copy_repo(tmp_path)
    marker = f"tinylm imported from {copy / 'tinylm'}"
    (copy / "tinylm/__init__.py").write_text(f"import sys\nprint({marker!r}, file=sys.stderr)\n")
    output = run_cmd(["dvc", "repro", "download"], copy)
    assert marker in output, output
    # Why the cmds say `python -m stages.NAME`: run by path, a stage script would find the installed
    # (workspace) package first.
    (copy / "stages/where.py").write_text("import tinylm\n")
    assert marker in run_cmd([sys.executable, "-m", "stages.where"], copy)
    assert marker not in run_cmd([sys.executable, "stages/where.py"], copy)
