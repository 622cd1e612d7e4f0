"""report: every earlier stage's outputs -> reports/report.md + reports/figures/*.png.

Reads only what the pipeline wrote (reports/*.json, the dvclive logs, data/model, data/tokenizer,
the first validation story for the attention maps); see tinylm/report/sections.py for the sections.
"""
from pathlib import Path

from tinylm.config import load_params
from tinylm.report.sections import FIGURES, REPORT, write_report
from tinylm.errors import run_stage


def main() -> None:
    params = load_params()
    report = write_report(Path("."), params)
    print(f"report: {REPORT} with {len(report.figures)} figures in {FIGURES}/")


if __name__ == "__main__":
    run_stage(main)
