"""environment.json: the versions behind data/model and data/export/hf, and the warning when they are not
the locked ones."""
from __future__ import annotations

from tinylm.records.environment import (PACKAGES, Environment, check_environment, current_environment, differences,
                                        pinned_versions)
from tinylm.records.io import read_record, write_record
from tinylm.report.markdown import Report
from tinylm.report.sections import environment_note


def test_the_record_names_the_installed_versions_in_the_same_bytes_every_time(tmp_path):
    environment = current_environment()
    assert tuple(environment.packages) == PACKAGES
    assert environment.packages["torch"].startswith("2.13.0")
    write_record(tmp_path / "a.json", environment)
    write_record(tmp_path / "b.json", current_environment())
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert read_record(tmp_path / "a.json", Environment, "pretrain") == environment


def test_the_pins_come_from_the_lock_and_torch_from_its_exact_line(repo_root):
    pins = pinned_versions(repo_root)
    assert pins["torch"] == "2.13.0" and {"transformers", "tokenizers", "numpy", "dvc"} <= set(pins)


def test_a_differing_version_is_named_and_a_build_label_is_not(repo_root):
    pins = {"torch": "2.13.0", "transformers": "5.24.0", "numpy": "2.4.6"}
    environment = Environment("3.11.9", {"torch": "2.13.0+cu128", "transformers": "5.25.0", "numpy": "2.4.6",
                                         "dvc": "3.67.1"})
    assert differences(environment, pins) == ["transformers 5.25.0 (lock 5.24.0)"]


def test_a_stage_under_other_versions_prints_one_warning_line(tmp_path, capsys):
    (tmp_path / "requirements.txt").write_text("torch==2.13.0\nnumpy>=2\n")
    (tmp_path / "requirements.lock").write_text("numpy==2.4.6 \\\n    --hash=sha256:00\ntransformers==5.24.0 \\\n")
    environment = Environment("3.11.9", {"torch": "2.14.0+cpu", "transformers": "5.24.0", "numpy": "2.5.0"})
    check_environment("export", environment, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("export: warning:")
    assert "torch 2.14.0+cpu (lock 2.13.0), numpy 2.5.0 (lock 2.4.6)" in lines[0]
    check_environment("export", Environment("3.11.9", {"torch": "2.13.0+cpu", "numpy": "2.4.6"}), tmp_path)
    assert capsys.readouterr().out == ""


def test_the_report_shows_the_versions():
    report = Report()
    environment_note(report, Environment("3.11.9", {"torch": "2.13.0+cpu", "transformers": "5.24.0"}),
                     "data/model/environment.json")
    assert "Python 3.11.9, torch 2.13.0+cpu, transformers 5.24.0 (`data/model/environment.json`" in report.markdown()
