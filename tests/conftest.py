"""Shared test fixtures: an isolated environment and a small synthetic consortium.

Every test session gets its own cache, privacy-state and Flower home folders (never the user's), and the
Hugging Face libraries are forced offline: nothing may be downloaded at run time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def shared_dir() -> Path:
    return Path(os.environ.get("LLNM_SHARED_DIR", ROOT.parent / "shared"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("env")
    os.environ["LLNM_CACHE_DIR"] = str(base / "cache")
    os.environ["LLNM_PRIVACY_DIR"] = str(base / "privacy")
    os.environ["FLWR_HOME"] = str(base / "flwr-home")
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def small_consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 sites, 210 patients in all (seed 11), written by the real `llnm-synth` console script."""
    out = tmp_path_factory.mktemp("consortium") / "c"
    subprocess.run([str(BIN / "llnm-synth"), "--out", str(out), "--sites", "7", "--patients", "210",
                    "--seed", "11"], check=True, capture_output=True, text=True)
    return out
