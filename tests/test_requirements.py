"""requirements.txt lists exactly what the code imports (plus the tools it is driven by), and
requirements.lock, what `make setup` installs, is up to date with its ranges (else: `make lock`)."""
from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

from packaging.requirements import Requirement

# Required without an import: the command that runs the pipeline, and a pytest plugin (addopts -n 2).
TOOLS = {"dvc", "pytest-xdist"}
# Imported, and installed as dependencies of a requirement: dvc depends on hydra-core, omegaconf and
# dvc-data (whose DataIndexError is what DVC's filesystem raises for an output a revision lacks).
VIA_EXTRAS = {"hydra-core": "dvc", "omegaconf": "dvc", "dvc-data": "dvc"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ranges(repo_root) -> dict[str, Requirement]:
    """requirements.txt: normalised name -> its requirement (name and version range)."""
    found = {}
    for line in (repo_root / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            found[normalise(requirement.name)] = requirement
    return found


def required(repo_root) -> set[str]:
    return set(ranges(repo_root))


def locked(repo_root) -> dict[str, tuple[str, list[str], list[str]]]:
    """requirements.lock: normalised name -> (version, hashes, what it is there for: its `# via` lines)."""
    entries: dict[str, tuple[str, list[str], list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", (repo_root / "requirements.lock").read_text()):
        pin = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if pin:
            after = block.split("# via", 1)[1] if "# via" in block else ""
            via = [line.lstrip("# ").strip() for line in after.splitlines() if line.strip(" #")]
            entries[normalise(pin.group(1))] = (pin.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block), via)
    return entries


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


def test_the_lock_pins_every_range_with_hashes(repo_root):
    lock = locked(repo_root)
    stale = []
    for name, requirement in ranges(repo_root).items():
        if name == "torch":
            continue  # installed first on its own (CPU or CUDA build), by its exact pin
        if name not in lock:
            stale.append(f"{requirement} is not in it")
        elif not requirement.specifier.contains(lock[name][0], prereleases=True):
            stale.append(f"it pins {name}=={lock[name][0]}, outside {requirement}")
    assert not stale, f"requirements.lock is out of date with requirements.txt ({'; '.join(stale)}): run `make lock`"
    unhashed = sorted(name for name, (_, hashes, _) in lock.items() if not hashes)
    assert not unhashed, f"requirements.lock pins {unhashed} without a hash: run `make lock`"


def test_the_lock_holds_nothing_the_ranges_dropped(repo_root):
    # pip-compile notes `-r requirements.txt` under each package listed there: a package removed from the
    # ranges, and needed by nothing else, must leave the lock too.
    listed = required(repo_root)
    for name, (_, _, via) in locked(repo_root).items():
        if "-r requirements.txt" in via:
            assert name in listed, f"requirements.lock still pins {name}, gone from requirements.txt: run `make lock`"


def test_torch_is_pinned_once_exactly_and_left_out_of_the_cpu_lock(repo_root):
    torch = ranges(repo_root)["torch"]
    assert [spec.operator for spec in torch.specifier] == ["=="], f"requirements.txt: torch must be exact, got {torch}"
    makefile = re.search(r"^TORCH \?= (\S+)$", (repo_root / "Makefile").read_text(), re.MULTILINE)
    assert makefile and makefile.group(1) == str(torch), "the Makefile's TORCH must equal requirements.txt's torch line"
    assert (repo_root / "requirements.lock").read_text().splitlines()[-1].endswith(f": {torch}"), (
        "requirements.lock's last line must name torch's pin (dvc.yaml's stages depend on the lock): run `make lock`")
    lock = locked(repo_root)
    # Left out so that a GPU user's CUDA build installs beside the same lock; resolved with the CPU build,
    # so none of the CUDA build's libraries are in it.
    assert "torch" not in lock and not [name for name in lock if name.startswith(("nvidia-cu", "triton"))]
