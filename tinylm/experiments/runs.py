"""Runs as DVC knows them, one row each: the workspace, branch and tag tips, and every experiment.

DVC's experiments API (`Repo.experiments.show`, what `dvc exp show --json` prints) gives each run's
params.yaml and metrics files; experiments pulled from a git remote (`dvc exp pull`) are refs like local
ones, so they come too. Runs are grouped by their *declared* params, the ones some stage in dvc.yaml
depends on (the stage's `params:` or a `${...}` in its cmd), less train.seed: runs of one group differ
only in the seed and in execution-only knobs (worker counts, checkpoint interval, where nodes meet),
which change no output byte (tests/test_execution_only.py), so their spread is seed noise.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from tinylm.errors import PipelineError

SEED = "train.seed"
# In pretrain's cmd, but only says where the nodes meet: any endpoint trains the same weights.
EXECUTION_ONLY_IN_CMD = frozenset({"train.rdzv_endpoint"})
DONE = "success"  # a run whose metrics are its own; queued, running and failed ones are listed, never averaged
PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class Run:
    name: str  # experiment name, branch or tag, "workspace", or the short sha
    rev: str  # the git commit holding the run's files, or "workspace"
    kind: str  # "workspace" | "commit" | "experiment"
    state: str  # "success" | "queued" | "running" | "failed"
    params: dict[str, Any]  # params.yaml, flattened to dotted keys (lists as JSON)
    metrics: dict[str, float]  # "file:dotted.key" -> value, every numeric metric


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    key = prefix[:-1]
    return {key: json.dumps(tree) if isinstance(tree, list) else tree}


def declared_params(dvc_yaml: Path) -> list[str]:
    """(prefixes, keys) of params.yaml that some stage depends on: a `params:` entry names a key or a
    whole section ("model"), and a `${train.nnodes}` in a cmd is a dependency too."""
    try:
        stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise PipelineError(f"{dvc_yaml}: cannot read the stages ({exc}); run inside the tinylm checkout") from None
    names: set[str] = set()
    for stage in stages.values():
        for entry in stage.get("params", []):
            if isinstance(entry, str):  # {file: [keys]} entries name other files than params.yaml
                names.add(entry)
        cmds = stage.get("cmd", [])
        for cmd in [cmds] if isinstance(cmds, str) else cmds:
            names.update(re.findall(r"\$\{([\w.]+)\}", cmd))
    return sorted(names)


def group_key(params: dict[str, Any], declared: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """The declared params less the seed: equal keys, same config."""
    prefixes = tuple(declared)
    kept = {k: v for k, v in params.items()
            if k != SEED and k not in EXECUTION_ONLY_IN_CMD and any(k == p or k.startswith(p + ".") for p in prefixes)}
    return tuple(sorted((k, json.dumps(v)) for k, v in kept.items()))


def _state(experiment: dict[str, Any]) -> str:
    executor = experiment.get("executor") or {}
    state = executor.get("state") or DONE
    return {"success": DONE, "queued": "queued", "running": "running"}.get(state, "failed")


def _run(name: str, rev: str, kind: str, state: str, data: dict[str, Any] | None) -> Run:
    data = data or {}
    params = data.get("params", {}).get(PARAMS_FILE, {}).get("data", {})
    metrics = {}
    for file, content in (data.get("metrics") or {}).items():
        for key, value in flatten(content.get("data") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{file}:{key}"] = float(value)
    return Run(name, rev, kind, state, flatten(params), metrics)


def collect(root: Path, revs: list[str] | None = None) -> list[Run]:
    """Every run DVC knows in the repository at `root`: the workspace, the tips of branches and tags, the
    baselines of every experiment ref and those experiments (queued, running and failed ones included).
    `revs` adds commits to look at (and their experiments)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import exp_refs
    from dvc.scm import SCMError

    try:
        with Repo(str(root)) as repo:
            baselines = sorted({ref.baseline_sha for ref in exp_refs(repo.scm)})
            shown = repo.experiments.show(revs=[*baselines, *(revs or [])] or None, all_branches=True,
                                          all_tags=True)
            entries = [state.dumpd() for state in shown]
    except (DvcException, SCMError, OSError) as exc:  # OSError: a queue task's files vanish as it is killed
        raise PipelineError(f"DVC cannot list the runs of {root}: {exc} (list revisions with `git branch -a`, "
                            "`git tag` and `dvc exp list --all-commits`)") from None
    runs: list[Run] = []
    seen: set[str] = set()
    for entry in entries:
        rev = entry["rev"]
        if rev in seen:
            continue
        seen.add(rev)
        if rev == "workspace":
            runs.append(_run("workspace", rev, "workspace", DONE, entry.get("data")))
        else:
            runs.append(_run(entry.get("name") or rev[:7], rev, "commit", DONE, entry.get("data")))
        for experiment in entry.get("experiments") or []:
            first = experiment["revs"][0]
            if first["rev"] in seen:
                continue
            seen.add(first["rev"])
            runs.append(_run(experiment.get("name") or first["rev"][:7], first["rev"], "experiment",
                             _state(experiment), first.get("data")))
    return _without_unchanged_workspace(runs)


def _without_unchanged_workspace(runs: list[Run]) -> list[Run]:
    """The workspace is a run of its own only when it differs from the commit it sits on (same params and
    metrics: the committed run itself, which would otherwise count twice)."""
    workspace = next((r for r in runs if r.kind == "workspace"), None)
    twins = [r for r in runs if r.kind == "commit" and workspace is not None
             and (r.params, r.metrics) == (workspace.params, workspace.metrics)]
    return [r for r in runs if not (r is workspace and twins)]


def resolve_metric(runs: list[Run], name: str) -> str:
    """`name` as a metrics column: "file:key" as given, or a key (or key suffix) found in exactly one file."""
    columns = {key for run in runs for key in run.metrics}
    if name in columns:
        return name
    matches = sorted({c for c in columns if c.split(":", 1)[1] == name or c.endswith(f":{name}")})
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise PipelineError(f"--metric {name}: no run has it; metrics found: "
                            f"{', '.join(sorted(c.split(':', 1)[1] for c in columns)[:12]) or 'none'}")
    raise PipelineError(f"--metric {name} is in several files ({', '.join(matches)}): name one as FILE:KEY")


def frame(runs: list[Run], declared: Iterable[str]) -> pd.DataFrame:
    """One row per run: name, rev, kind, state, seed, group (an id per distinct declared-params key), the
    params and the metrics as columns."""
    declared = list(declared)
    keys = [group_key(run.params, declared) for run in runs]
    ids = {key: index for index, key in enumerate(dict.fromkeys(keys))}
    rows = [{"name": run.name, "rev": run.rev, "kind": run.kind, "state": run.state, "seed": run.params.get(SEED),
             "group": ids[key], "key": key, **{f"param:{k}": v for k, v in run.params.items()}, **run.metrics}
            for run, key in zip(runs, keys)]
    return pd.DataFrame(rows)
