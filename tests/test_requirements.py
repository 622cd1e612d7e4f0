"""requirements.txt lists exactly what the code imports (plus the tools it is driven by)."""
from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

# Required without an import: the command that runs the pipeline, and a pytest plugin (addopts -n 2).
TOOLS = {"dvc", "pytest-xdist"}
# Imported, and installed as dependencies of a requirement: dvc depends on hydra-core, omegaconf and
# dvc-data (whose DataIndexError is what DVC's filesystem raises for an output a revision lacks).
VIA_EXTRAS = {"hydra-core": "dvc", "omegaconf": "dvc", "dvc-data": "dvc"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def required(repo_root) -> set[str]:
    names = set()
    for line in (repo_root / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(normalise(re.match(r"[A-Za-z0-9_.-]+", line).group(0)))
    return names


def imported_modules(repo_root) -> set[str]:
    modules = set()
    for folder in ("tinylm", "stages", "tests", "benchmarks"):
        for path in (repo_root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    # Test modules and benchmark scripts import their neighbours from their own folder.
    local = {"tinylm", "conftest", "trainer_helpers"} | {p.stem for folder in ("tests", "benchmarks")
                                                         for p in (repo_root / folder).glob("*.py")}
    return {m for m in modules - local if m not in sys.stdlib_module_names}


def test_requirements_are_exactly_the_imports(repo_root):
    distributions = packages_distributions()
    used = set()
    for module in imported_modules(repo_root):
        assert module in distributions, f"{module} is imported but no installed distribution provides it"
        used |= {normalise(d) for d in distributions[module]}
    used = {VIA_EXTRAS.get(d, d) for d in used}
    listed = required(repo_root)
    assert used - listed == set(), f"imported but not in requirements.txt: {sorted(used - listed)}"
    assert listed - used - TOOLS == set(), f"in requirements.txt but never imported: {sorted(listed - used - TOOLS)}"
