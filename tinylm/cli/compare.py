"""`tinylm compare`: which differences between runs are real.

Reads every run DVC knows (the workspace, branch and tag tips, every experiment, pulled ones included),
groups the finished ones by config (their declared params less train.seed), and for each group prints
n, mean +- sd and the 95% CI of the metric, and against the baseline group the difference, its 95% CI
(Welch), the p-value and a verdict. `--paired A B` scores two models on the same validation stories
instead: a paired bootstrap CI of their bits-per-byte difference, evaluation noise only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from tinylm.errors import PipelineError

NOISE_FLOOR = Path("benchmarks/noise_floor.json")
DEFAULT_METRIC = "val_bpb"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[1]
    parser.add_argument("revs", nargs="*", metavar="REV",
                        help="more commits to read, with their experiments (default: the workspace, branch and tag "
                             "tips, and the commits experiments were run on)")
    parser.add_argument("--baseline", metavar="REV|NAME",
                        help="compare against the group of this run: an experiment, branch, tag, commit or "
                             "'workspace' (default: the group with the workspace's params)")
    parser.add_argument("--metric", default=DEFAULT_METRIC,
                        help="metric to compare, a key in a metrics file or FILE:KEY (default: %(default)s); lower "
                             "is better unless --higher-is-better")
    parser.add_argument("--higher-is-better", action="store_true", help="the verdict's direction for --metric")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--md", action="store_true", help="markdown tables")
    output.add_argument("--json", action="store_true", help="JSON: every group, run and statistic")
    parser.add_argument("--plot", metavar="FILE.png", type=Path,
                        help="also draw each group's metric with its CI and its val-loss curves (mean ± sd band)")
    parser.add_argument("--noise-floor", metavar="FILE", type=Path,
                        help=f"measured seed noise shown where a side has one run (default: {NOISE_FLOOR} of the repo)")
    parser.add_argument("--write-noise-floor", metavar="FILE", type=Path,
                        help="add the compared groups to FILE's noise floor (a new run of a recorded seed replaces it) "
                             "and write it; configs with two or more runs are kept")
    paired = parser.add_argument_group("paired evaluation (for runs too expensive to repeat)")
    paired.add_argument("--paired", nargs=2, metavar=("REV_A", "REV_B"),
                        help="score the models of two revisions on the same validation stories: bpb(A) - bpb(B) with "
                             "a paired bootstrap CI over stories")
    paired.add_argument("--stories", metavar="FILE", type=Path,
                        help="stories to score, <|endoftext|>-separated (default: data/clean/val.txt of the repo)")
    paired.add_argument("--max-stories", type=int, default=0, help="score the first N stories only (0: all)")
    paired.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default: %(default)s)")
    paired.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def run(args: argparse.Namespace) -> int:
    from tinylm.cli.models import _repo_root

    root = _repo_root()
    if args.paired:
        return _paired(args, root, sys.stdout)
    from tinylm.experiments import groups as grouping
    from tinylm.experiments.runs import DONE, collect, declared_params, frame, group_key, resolve_metric

    declared = declared_params(root / "dvc.yaml")
    runs = collect(root, args.revs)
    if not any(r.kind == "experiment" for r in runs) and len(runs) < 2:
        raise PipelineError("no experiments to compare: queue some, e.g. "
                            "`dvc exp run --queue -S 'train.seed=range(1,6)'`, then `dvc queue start`")
    metric = resolve_metric([r for r in runs if r.state == DONE], args.metric)
    table = frame(runs, declared)
    workspace = next((r for r in runs if r.kind == "workspace"), None) or next(r for r in runs if r.kind == "commit")
    baseline = grouping.choose_baseline(table, args.baseline, group_key(workspace.params, declared))
    floors = grouping.load_noise_floor(args.noise_floor or root / NOISE_FLOOR)
    references = grouping.compositions(root / "conf", declared)
    groups = grouping.summarise(table, metric, baseline, floors, references, lower_is_better=not args.higher_is_better)
    unfinished = table[table["state"] != DONE]
    labels = {g.id: g.label for g in groups}
    pending = [{"name": row.name, "state": row.state, "seed": row.seed,
                "group": labels.get(row.group) or grouping.label(dict(row.key), references)}
               for row in unfinished.itertuples()]
    if args.write_noise_floor:
        values = dict(zip(table["name"], table[metric]))
        floors_out = grouping.noise_floors(groups, metric, values, grouping.load_noise_floor(args.write_noise_floor))
        from tinylm.files import write_json

        write_json(args.write_noise_floor, {"recipes": [vars(f) for f in floors_out]})
    if args.plot:
        from tinylm.experiments.plot import figure, read_curves

        revs = dict(zip(table["name"], table["rev"]))
        fig = figure(groups, metric, read_curves(root, {n: revs[n] for g in groups for n in g.runs}))
        fig.savefig(args.plot, dpi=120)
    if args.json:
        print(json.dumps({"metric": metric, "groups": grouping.as_json(groups), "unfinished": pending}, indent=2))
    else:
        _print_tables(groups, metric, pending, markdown=args.md, out=sys.stdout)
    return 0


def _pm(spread, digits: int = 4) -> str:
    if spread is None:
        return "-"
    if spread.n == 1:
        return f"{spread.mean:.{digits}f}"
    return f"{spread.mean:.{digits}f} ± {spread.sd:.{digits}f}"


def _ci(low: float, high: float, digits: int = 4) -> str:
    return "-" if math.isnan(low) else f"[{low:.{digits}f}, {high:.{digits}f}]"


def _signed(value: float, digits: int = 4) -> str:
    return f"{value:+.{digits}f}"


def _print_tables(groups, metric: str, pending: list[dict], markdown: bool, out: TextIO) -> None:
    from tinylm.experiments.groups import LOAD_DEPENDENT, SUMMARY_METRICS

    name = metric.split(":", 1)[1]
    header = ["group", "n", f"{name} mean ± sd", "95% CI", "Δ vs baseline", "Δ 95% CI (Welch)", "p", "verdict"]
    rows = []
    for g in groups:
        d = g.vs_baseline
        rows.append([g.label + (" (baseline)" if g.baseline else ""), g.metric.n, _pm(g.metric),
                     _ci(g.metric.ci_low, g.metric.ci_high), "" if g.baseline else _signed(g.diff),
                     _ci(d.ci_low, d.ci_high) if d else "", f"{d.p_value:.3g}" if d else "",
                     d.verdict if d else g.note])
    _emit(header, rows, markdown, out)
    out.write("\n")
    header = ["group", *[f"{m}{' †' if m in LOAD_DEPENDENT else ''}" for m in SUMMARY_METRICS]]
    rows = [[g.label, *[_pm(g.summaries[m], 1 if m in LOAD_DEPENDENT else 4) for m in SUMMARY_METRICS]] for g in groups]
    _emit(header, rows, markdown, out)
    out.write(("\n" if markdown else "") + "† depends on the machine and whatever else ran on it, not only on the config.\n")
    repeats = [f"{name} (repeats {counted})" for g in groups for name, counted in g.repeats.items()]
    if repeats:
        out.write(f"\nCounted once, a seed already in its group: {', '.join(repeats)}\n")
    if pending:
        counts = Counter((p["group"], p["state"]) for p in pending)
        out.write(f"\nNot averaged, {len(pending)} unfinished run(s): " +
                  "; ".join(f"{n} {state}: {group}" for (group, state), n in counts.items()) + "\n")


def _emit(header: list[str], rows: list[list], markdown: bool, out: TextIO) -> None:
    if markdown:
        from tinylm.report.markdown import escape, table

        out.write("\n".join(table(header, [[escape(str(c)) for c in row] for row in rows])))
        return
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        if index == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def _paired(args: argparse.Namespace, root: Path, out: TextIO) -> int:
    from tinylm.cli.models import Source, load, resolve_device
    from tinylm.corpus.formats import iter_eot_stories
    from tinylm.experiments.paired import story_scores
    from tinylm.experiments.stats import paired_bootstrap_bpb

    stories_file = args.stories or root / "data/clean/val.txt"
    try:
        stories = list(iter_eot_stories(stories_file))
    except OSError as exc:
        raise PipelineError(f"{stories_file}: cannot read the stories ({exc}); run `dvc repro clean` or pass "
                            "--stories FILE") from None
    if args.max_stories:
        stories = stories[:args.max_stories]
    if len(stories) < 2:
        raise PipelineError(f"{stories_file}: {len(stories)} stories; a paired comparison needs two or more")
    device = resolve_device(args.device)
    scores = []
    for rev in args.paired:
        loaded = load(Source(label=f"rev {rev}", repo=root, rev=rev), device)
        block = loaded.model.config.block_size
        scores.append(story_scores(loaded.model, loaded.tokenizer, stories, stride=block, batch_size=16, desc=rev))
    a, b = scores
    result = paired_bootstrap_bpb(a.nll, b.nll, a.num_bytes, resamples=args.resamples)
    name_a, name_b = args.paired
    out.write(f"{result.stories} stories of {stories_file}: bpb {name_a} {result.bpb_a:.4f}, {name_b} "
              f"{result.bpb_b:.4f}\n")
    out.write(f"difference {name_a} - {name_b}: {result.diff:+.4f} bits/byte, 95% CI "
              f"[{result.ci_low:+.4f}, {result.ci_high:+.4f}] (paired bootstrap over stories, "
              f"{result.resamples} resamples)\n")
    excluded = result.ci_low > 0 or result.ci_high < 0
    out.write(("the CI excludes 0: on these stories the two models differ" if excluded else
               "the CI includes 0: no detectable difference on these stories") +
              ". Evaluation noise only: it says nothing about seed noise (another seed of either run could land "
              "anywhere in its recipe's seed spread; `tinylm compare` with repeated seeds measures that).\n")
    return 0
