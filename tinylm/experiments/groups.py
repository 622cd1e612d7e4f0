"""Runs grouped by config, each group summarised and set against a baseline group.

A group is the finished runs that share their declared params apart from the seed (runs.group_key), each
seed counted once: a run repeating a seed already in its group (the same run at a branch tip and in the
workspace, or a seed rerun in another clone) is one draw of the seed noise, not two, so it is listed as a
repeat and left out of n.
Its label names the nearest recipe composed from conf/ and the params where the group differs from it. The baseline
is the group of a named run, else the group with the workspace's params. A side with one run gets no
verdict: one seed says nothing about seed noise, so the row shows the measured seed noise of the
nearest recipe in the noise floor file instead.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import OmegaConf

from tinylm.errors import PipelineError
from tinylm.experiments.runs import DONE
from tinylm.experiments.stats import Difference, Spread, spread, welch

# Shown beside the metric compared: mean +- sd per group. Seconds and throughput measure the machine
# and whatever else ran on it as much as the config (two queued runs in parallel halve tokens/s).
SUMMARY_METRICS = {"val_bpb": "reports/eval.json:val_bpb", "val_loss": "reports/eval.json:val_loss",
                   "val_ppl": "reports/eval.json:val_ppl", "train_seconds": "reports/train/metrics.json:elapsed_s",
                   "tokens_per_s": "reports/train/metrics.json:tokens_per_s"}
LOAD_DEPENDENT = frozenset({"train_seconds", "tokens_per_s"})
KEEP_FIRST = {"commit": 0, "experiment": 1, "workspace": 2}  # which run of a repeated seed counts
LABEL_PARAMS = 4  # a label lists at most this many differing params, then "+N more"


@dataclass(frozen=True)
class NoiseFloor:
    """One recipe's measured seed noise (benchmarks/noise_floor.json)."""

    label: str
    metric: str
    params: dict[str, str]  # its declared params less the seed, values as JSON
    runs: dict[str, float]  # run name -> metric
    seeds: dict[str, Any]  # run name -> train.seed: a seed counts once, whichever clone or session ran it
    n: int
    mean: float
    sd: float


@dataclass(frozen=True)
class Group:
    id: int
    label: str
    baseline: bool
    runs: list[str]
    seeds: list[Any]
    metric: Spread
    diff: float  # mean - the baseline group's mean
    summaries: dict[str, Spread | None]
    vs_baseline: Difference | None  # None for the baseline itself, or when a side has one run
    note: str = ""  # why there is no verdict
    params: dict[str, str] = field(default_factory=dict)
    repeats: dict[str, str] = field(default_factory=dict)  # run left out -> the counted run of its seed


def load_noise_floor(path: Path) -> list[NoiseFloor]:
    if not path.is_file():
        return []
    try:
        return [NoiseFloor(**entry) for entry in json.loads(path.read_text())["recipes"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: not a noise floor file ({exc}); write it again with "
                            f"`tinylm compare --write-noise-floor {path}`") from None


def compositions(conf_dir: Path, declared: list[str]) -> dict[str, dict[str, str]]:
    """Each recipe on each profile of conf/, composed as `dvc exp run -S recipe=R -S profile=P` would, as
    group keys: what a label names a config by. The default profile's name is left out."""
    from hydra import compose, initialize_config_dir

    from tinylm.experiments.runs import flatten, group_key

    names = {kind: sorted(p.stem for p in (conf_dir / kind).glob("*.yaml")) for kind in ("recipe", "profile")}
    defaults = yaml.safe_load((conf_dir / "config.yaml").read_text()).get("defaults", [])
    default_profile = next((d["profile"] for d in defaults if isinstance(d, dict) and "profile" in d), None)
    out = {}
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
        for recipe in names["recipe"]:
            for profile in names["profile"]:
                composed = OmegaConf.to_container(compose("config", [f"recipe={recipe}", f"profile={profile}"]))
                name = f"recipe={recipe}" + ("" if profile == default_profile else f" profile={profile}")
                out[name] = dict(group_key(flatten(composed), declared))
    return out


def label(params: dict[str, str], references: dict[str, dict[str, str]], verbose: bool = False) -> str:
    """The nearest composed recipe, then the params that differ from it: "recipe=modern, train.lr=0.002".
    Params the run does not have (added to conf/ after it was made) are named only when `verbose`."""
    if not references:
        return ", ".join(f"{k}={json.loads(v)}" for k, v in params.items())[:120]
    name, reference = min(references.items(), key=lambda item: _distance(params, item[1]))
    differing = [f"{k}={json.loads(v)}" for k, v in params.items() if reference.get(k) != v]
    unset = [k for k in reference if k not in params]
    shown = differing[:LABEL_PARAMS]
    more = len(differing) - len(shown)
    return ", ".join([name, *shown]) + (f", +{more} more" if more else "") + (
        f" (without {', '.join(unset)})" if unset and verbose else "")


def _distance(params: dict[str, str], reference: dict[str, str]) -> int:
    return sum(reference.get(k) != v for k, v in params.items()) + sum(k not in params for k in reference)


def _nearest(params: dict[str, str], floors: list[NoiseFloor], metric: str) -> NoiseFloor | None:
    candidates = [f for f in floors if f.metric == metric]
    if not candidates:
        return None
    return min(candidates, key=lambda f: _distance(params, f.params))


def choose_baseline(runs: pd.DataFrame, baseline: str | None, workspace_key: tuple) -> int:
    """The group id of the run named `baseline` (experiment, branch, tag, sha prefix, "workspace"), else the
    group whose params are the workspace's."""
    if baseline is not None:
        named = runs[(runs["name"] == baseline) | runs["rev"].str.startswith(baseline)]
        if named.empty:
            raise PipelineError(f"--baseline {baseline}: no run is called that; name an experiment, branch, tag or "
                                "commit that `tinylm compare` lists")
        return int(named["group"].iloc[0])
    matching = runs[runs["key"].apply(lambda key: key == workspace_key)]
    if matching.empty:
        raise PipelineError("no run has the workspace's params, so there is no default baseline: name one with "
                            "--baseline REV|NAME")
    return int(matching["group"].iloc[0])


def summarise(runs: pd.DataFrame, metric: str, baseline_group: int, floors: list[NoiseFloor],
              references: dict[str, dict[str, str]], lower_is_better: bool = True) -> list[Group]:
    """Every group of finished runs, the baseline first, then in order of the metric's mean."""
    done = runs[runs["state"] == DONE]
    missing = done[done[metric].isna()] if metric in done else done
    if not missing.empty:
        raise PipelineError(f"metric {metric} is missing in run(s) {', '.join(missing['name'])}: compare another "
                            "metric with --metric, or leave those runs out by naming the revisions to compare")
    if baseline_group not in set(done["group"]):
        raise PipelineError("the baseline group has no finished run yet (queued, running or failed): wait for it, "
                            "or name another with --baseline")
    params_of = {int(g): dict(rows["key"].iloc[0]) for g, rows in done.groupby("group")}
    counted, repeats = _one_run_per_seed(done)
    base_values = counted.loc[counted["group"] == baseline_group, metric].to_list()
    groups = []
    for group_id, rows in counted.groupby("group"):
        values = rows[metric].to_list()
        summaries = {name: spread(rows[column].to_list()) if column in rows and rows[column].notna().all() else None
                     for name, column in SUMMARY_METRICS.items()}
        difference, note = None, ""
        if group_id != baseline_group:
            if len(values) >= 2 and len(base_values) >= 2:
                difference = welch(values, base_values, lower_is_better)
            else:
                floor = _nearest(params_of[int(group_id)], floors, metric)
                note = "n = 1 on a side: no verdict"
                if floor is not None:
                    note += f"; seed sd of {floor.label}: {floor.sd:.4f} (n = {floor.n})"
        groups.append(Group(id=int(group_id), baseline=bool(group_id == baseline_group), label=label(params_of[int(group_id)], references),
                            runs=rows["name"].to_list(), seeds=rows["seed"].to_list(), metric=spread(values),
                            diff=spread(values).mean - spread(base_values).mean,
                            summaries=summaries, vs_baseline=difference, note=note, params=params_of[int(group_id)],
                            repeats=repeats.get(int(group_id), {})))
    groups.sort(key=lambda g: (g.id != baseline_group, g.metric.mean))
    return _distinct_labels(groups, references)


def _one_run_per_seed(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, dict[str, str]]]:
    """The runs with each seed once per group, and per group the left-out repeats, each named with the
    run it repeats. Of a seed's runs a commit's is kept, then an experiment's, the workspace's last: the
    name kept is written into the noise floor file, and a branch or experiment name means the same in
    every clone. Runs without a seed param all count."""
    runs = runs.sort_values("kind", key=lambda kind: kind.map(KEEP_FIRST), kind="stable")
    repeated = runs["seed"].notna() & runs.duplicated(["group", "seed"], keep="first")
    kept = {(row.group, row.seed): row.name for row in runs[~repeated].itertuples()}
    repeats: dict[int, dict[str, str]] = {}
    for row in runs[repeated].itertuples():
        repeats.setdefault(int(row.group), {})[row.name] = kept[(row.group, row.seed)]
    return runs[~repeated], repeats


def _distinct_labels(groups: list[Group], references: dict[str, dict[str, str]]) -> list[Group]:
    """Groups that would read the same (one predates a param) get the verbose label."""
    seen = Counter(g.label for g in groups)
    return [dataclasses.replace(g, label=label(g.params, references, verbose=True)) if seen[g.label] > 1 else g
            for g in groups]


def noise_floors(groups: list[Group], metric: str, values: dict[str, float],
                 earlier: Sequence[NoiseFloor] = ()) -> list[NoiseFloor]:
    """The groups' runs added to the `earlier` entry of the same config, and the entries with two or more runs.

    Experiment refs live in one clone, so a noise floor grows across clones and sessions through the
    committed file: a new run joins the runs already recorded for its params, and replaces a recorded run
    of the same seed (a seed run again on another machine is still one draw of the seed noise)."""
    merged = {(f.metric, tuple(sorted(f.params.items()))): f for f in earlier}
    for g in groups:
        key = (metric, tuple(sorted(g.params.items())))
        runs, seeds = (dict(merged[key].runs), dict(merged[key].seeds)) if key in merged else ({}, {})
        for name, seed in zip(g.runs, g.seeds):
            for repeated in [r for r, s in seeds.items() if s == seed]:
                del runs[repeated], seeds[repeated]
            runs[name], seeds[name] = values[name], seed
        total = spread(list(runs.values()))
        merged[key] = NoiseFloor(label=g.label, metric=metric, params=g.params, runs=runs, seeds=seeds,
                                 n=total.n, mean=total.mean, sd=total.sd)
    return [f for f in merged.values() if f.n >= 2]


def as_json(groups: list[Group]) -> list[dict[str, Any]]:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return [clean(asdict(g)) for g in groups]
