"""Shared fixtures: paths to the repository and to ../shared (the offline data and GPT-2 files)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"

# tiktoken must find GPT-2's files offline.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DIR / "tiktoken-cache"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED_DIR / "data" / "tinystories").is_dir():
        pytest.fail(f"{SHARED_DIR} is missing: the tests need ../shared beside the checkout (see README)")
    return SHARED_DIR
