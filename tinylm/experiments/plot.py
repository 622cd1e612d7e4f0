"""`tinylm compare --plot`: each group's metric with its 95% CI, and its validation-loss curves as a
mean +- sd band against the optimizer step (every run's reports/train/plots/metrics/val_loss.tsv, the
file dvclive writes and `dvc plots show` draws, read at the run's commit through DVC)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tinylm.experiments.groups import Group  # noqa: E402

VAL_LOSS_TSV = "reports/train/plots/metrics/val_loss.tsv"


def read_curves(root: Path, revs: dict[str, str]) -> dict[str, pd.DataFrame]:
    """run name -> its val_loss.tsv (columns step, val_loss), at each run's commit ("workspace": on disk);
    runs without the file are left out."""
    from dvc.api import DVCFileSystem

    curves = {}
    for name, rev in revs.items():
        try:
            if rev == "workspace":
                text = (root / VAL_LOSS_TSV).read_text()
            else:
                text = DVCFileSystem(str(root), rev=rev).read_text(VAL_LOSS_TSV)
        except (FileNotFoundError, OSError):
            continue
        curves[name] = pd.read_csv(io.StringIO(text), sep="\t")
    return curves


def band(curves: list[pd.DataFrame]) -> pd.DataFrame:
    """Mean and sample sd of val_loss at each step the runs share (sd 0 for a single run)."""
    merged = pd.concat([c.set_index("step")["val_loss"].rename(i) for i, c in enumerate(curves)], axis=1).dropna()
    return pd.DataFrame({"mean": merged.mean(axis=1),
                         "sd": merged.std(axis=1, ddof=1).fillna(0.0) if len(curves) > 1 else 0.0})


def figure(groups: list[Group], metric: str, curves: dict[str, pd.DataFrame]) -> Figure:
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.45 * len(groups) + 1.5)),
                                      gridspec_kw={"width_ratios": [1, 1.2]})
    y = np.arange(len(groups))[::-1]
    means = [g.metric.mean for g in groups]
    half = [0.0 if math.isnan(g.metric.ci_low) else g.metric.mean - g.metric.ci_low for g in groups]
    bars.errorbar(means, y, xerr=half, fmt="o", capsize=4, color="C0")
    bars.set_yticks(y, [f"{g.label}{' (baseline)' if g.baseline else ''}\nn = {g.metric.n}" for g in groups],
                    fontsize=7)
    bars.set_xlabel(f"{metric} (mean, 95% CI)")
    bars.grid(axis="x", alpha=0.3)
    for index, group in enumerate(groups):
        runs = [curves[name] for name in group.runs if name in curves]
        if not runs:
            continue
        stats = band(runs)
        colour = f"C{index % 10}"
        lines.plot(stats.index, stats["mean"], color=colour, label=f"{group.label} (n = {len(runs)})")
        lines.fill_between(stats.index, stats["mean"] - stats["sd"], stats["mean"] + stats["sd"], color=colour,
                           alpha=0.2)
    lines.set_xlabel("optimizer step")
    lines.set_ylabel("validation loss (nats/token), mean ± sd")
    lines.grid(alpha=0.3)
    if lines.lines:
        lines.legend(fontsize=6)
    fig.tight_layout()
    return fig
