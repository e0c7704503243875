"""Shared test fixtures: an isolated environment and one small synthetic consortium for the whole session.

Every test session gets its own cache, privacy-state and Flower home folders (never the user's), and the
Hugging Face libraries are forced offline: nothing may be downloaded at run time.

`small_consortium` is the one generated consortium of the suite: the layout, DICOM and truth checks
(test_synthetic), the site checker (test_site_check), the site-tensor cache (test_preprocessing) and every
federated run (test_federation, test_privacy, test_site_policy) read it, and none of them writes into it
(tests that damage a site work on a copy in their own temporary folder).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The shared consortium's arguments; tests that check what llnm-synth recorded compare with these.
CONSORTIUM_SITES = 7
CONSORTIUM_PATIENTS = 210
CONSORTIUM_SEED = 11


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
    # Subprocesses (baselines, status, evaluate, llnm-synth) on one OpenMP thread, like the in-process tests
    # below: on a loaded 2-core machine two spinning OpenMP threads per process make CPU training crawl.
    # (Simulated and deployed sites set their own threads: one each.)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """In-process models are tiny: run them on one thread. On a shared 2-core machine two OpenMP threads
    competing with other processes run up to 10x slower than one. (Subprocesses -- simulations, SuperNodes,
    baselines -- choose their own threads.)"""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def small_consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 sites, 210 patients in all (seed 11, default image size), written by the real `llnm-synth` console
    script. Read-only for every test."""
    out = tmp_path_factory.mktemp("consortium") / "c"
    done = subprocess.run([str(BIN / "llnm-synth"), "--out", str(out), "--sites", str(CONSORTIUM_SITES),
                           "--patients", str(CONSORTIUM_PATIENTS), "--seed", str(CONSORTIUM_SEED), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"llnm-synth failed:\n{done.stdout}\n{done.stderr}"
    assert json.loads((out / "consortium.json").read_text())["seed"] == CONSORTIUM_SEED
    return out
