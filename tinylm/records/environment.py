"""environment.json: the library versions that produced a stage's outputs, written beside them.

The environment is an input no dvc.yaml entry hashes: transformers writes its own version into the
export's config.json, and any library can move a number or a byte. pretrain writes this record into
data/model and export into data/export/hf, so a hash that differs from the committed dvc.lock can be
explained; `check_environment` warns, in one line, when the versions differ from what `make setup`
installs: requirements.lock, and torch's exact pin in requirements.txt (torch is installed on its own,
CPU or CUDA build, so the lock leaves it out). Only the installed distributions' metadata is read:
nothing here imports torch.
"""
from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The libraries whose versions shape data/model and data/export/hf (the numbers, the files' bytes).
PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "dvc")
LOCK = Path("requirements.lock")
TORCH_PIN = Path("requirements.txt")
FILE = "environment.json"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


@dataclass(frozen=True)
class Environment:
    """data/model/environment.json and data/export/hf/environment.json."""

    python: str  # e.g. 3.11.9
    packages: dict[str, str]  # distribution -> installed version (torch with its build: 2.13.0+cpu)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def current_environment() -> Environment:
    return Environment(python=platform.python_version(), packages={name: installed_version(name) for name in PACKAGES})


def pinned_versions(root: Path = Path(".")) -> dict[str, str]:
    """Normalised name -> version of every `name==version` in requirements.lock and requirements.txt."""
    pins: dict[str, str] = {}
    for path in (root / TORCH_PIN, root / LOCK):
        if path.is_file():
            pins |= {normalise(name): pinned for name, pinned in _PIN.findall(path.read_text(encoding="utf-8"))}
    return pins


def differences(environment: Environment, pins: dict[str, str]) -> list[str]:
    """'name installed (lock pinned)' for each recorded package whose version is not the pinned one.

    A local build label is not a difference: torch 2.13.0+cpu and 2.13.0+cu128 are both torch==2.13.0.
    """
    found = []
    for name, installed in environment.packages.items():
        pinned = pins.get(normalise(name))
        if pinned is not None and installed.split("+")[0] != pinned.split("+")[0]:
            found.append(f"{name} {installed} (lock {pinned})")
    return found


def check_environment(stage: str, environment: Environment, root: Path = Path(".")) -> None:
    """One warning line when the environment is not the locked one; the stage still runs."""
    found = differences(environment, pinned_versions(root))
    if found:
        print(f"{stage}: warning: versions differ from {LOCK}: {', '.join(found)}; outputs may differ from "
              "the committed dvc.lock (fix: `make setup` in a fresh .venv)")
