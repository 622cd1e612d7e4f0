"""Training metrics: rows kept in memory (they ride along in the checkpoint) and mirrored to dvclive.

A resumed run rebuilds the dvclive directory from the checkpoint's rows instead of opening it with
`Live(resume=True)`, for two reasons: `dvc repro` deletes the stage's declared outputs (the plots
directory and metrics.json among them) before rerunning it, so there may be nothing on disk to
resume; and when there is, it also holds the rows logged after the checkpoint by a run that was
then killed, so those steps would appear twice. Rebuilding gives exactly the files an
uninterrupted run writes. dvclive is told not to write a dvc.yaml or save an
experiment (`dvc.yaml` declares the metrics and plots, and DVC already tracks the params).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dvclive import Live


class MetricLog:
    def __init__(self, directory: str | Path, history: list[dict[str, Any]], enabled: bool):
        """`enabled` is False on every rank but local rank 0 (one per node): they keep the rows but write nothing."""
        self.history = [dict(row) for row in history]
        self.live = Live(str(directory), dvcyaml=False, save_dvc_exp=False) if enabled else None
        if self.live is not None:
            for row in self.history:
                self._mirror(row)
            self.live.make_summary()

    def _mirror(self, row: dict[str, Any]) -> None:
        self.live.step = row["step"]
        for name, value in row.items():
            if name != "step":
                self.live.log_metric(name, value)

    def write(self, step: int, **metrics: float) -> None:
        """One row of the history: the metrics at `step`, each plotted against it."""
        row = {"step": step, **metrics}
        self.history.append(row)
        if self.live is not None:
            self._mirror(row)
            self.live.make_summary()

    def summary(self, **values: float) -> None:
        """Values for metrics.json only (no plot), e.g. the batch size in tokens."""
        if self.live is not None:
            for name, value in values.items():
                self.live.log_metric(name, value, plot=False)

    def finish(self) -> None:
        if self.live is not None:
            self.live.end()
