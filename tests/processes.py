"""Helpers for tests that run federations: the demo experiment as the tests configure it, checks of round
records, folder digests. Starting and watching the real processes is `fl_research.loopback`, shared with the
benchmarks (re-exported here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from fl_research.loopback import BIN, ROOT, Loopback, free_port, rounds_of, start, stop, wait_for_port
from fl_server.config import load_config

__all__ = ["BIN", "METRIC_KEYS", "ROOT", "Loopback", "assert_round_metrics", "demo_experiment", "fault_config",
           "first_patients", "free_port", "prebuild_caches", "record_fault", "rounds_of", "start", "stop",
           "tree_digest", "wait_for_port", "write_config"]
METRIC_KEYS = {"auc", "accuracy", "sensitivity", "specificity", "n"}


def demo_experiment() -> dict:
    """configs/demo.yaml as a dict, one pass over the data per round and an evaluation every round: the tests
    check the round loop round by round in a few rounds (the demo's quarter-pass rounds are measured by
    benchmarks/bench_federated.py; tests that need them set federation.rounds_per_epoch)."""
    exp = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    exp["federation"].update({"rounds_per_epoch": 1, "eval_every": 1})
    return exp


def write_config(tmp_path: Path, **sections: dict) -> Path:
    base = demo_experiment()
    # The demo's sites explain its final model; tests ask for it where they check it (it costs time).
    base["evaluation"] = {"explain": False}
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def fault_config(tmp_path: Path, name: str, federation: dict, privacy: dict | None = None) -> Path:
    """The demo experiment as the fault scenarios run it: small batches, no explanations, `federation` and
    `privacy` as given; written to TMP/exp.yaml."""
    exp = demo_experiment()
    exp["name"] = name
    exp["evaluation"] = {"explain": False}
    exp["train"].update({"batch_size": 8, "lr": 0.001})
    exp["federation"].update({"eval_bootstrap": 0, "final_eval_split": None, **federation})
    if privacy:
        exp["privacy"] = privacy
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def prebuild_caches(sites: list[Path], config: Path) -> None:
    """Sites build their preprocessing cache once before joining (as `llnm-site check`/join would)."""
    from shared_model.sitedata.cache import build_site_tensors

    pre = load_config(config).preprocess
    for site in sites:
        build_site_tensors(site, pre, cache_dir=Path(os.environ["LLNM_CACHE_DIR"]), progress=False)


def assert_round_metrics(entry: dict, sites: set[str]) -> None:
    """Every site's metrics are there; exact replies pool to exactly their sum, DP replies (the sites' default
    policy, `eval-dp-*`) to an estimate from their noisy histograms."""
    assert set(entry["sites"]) == sites, entry["sites"].keys()
    for name, m in entry["sites"].items():
        assert set(m) >= METRIC_KEYS, (name, m)
        assert m["n"] > 0 or "dp" in m
    if any("dp" in m for m in entry["sites"].values()):
        assert entry["pooled"]["noisy"] is True and entry["pooled"]["n_sites"] == len(sites)
    else:
        assert entry["pooled"]["n"] == sum(m["n"] for m in entry["sites"].values())




def tree_digest(folder: Path) -> str:
    """SHA-256 over a folder's relative paths and file contents: equal digests, an untouched folder."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def first_patients(site: Path, out: Path, n: int) -> Path:
    """A copy of `site` whose table keeps its first `n` patient rows (a quick site for slow paths)."""
    import shutil

    shutil.copytree(site, out)
    lines = (site / "patients.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "patients.csv").write_text("".join(lines[: n + 1]), encoding="utf-8")
    return out


def record_fault(name: str, figures: dict) -> None:
    """Write a fault scenario's figures for benchmarks/bench_faults.py (only when it asks, through
    LLNM_FAULT_RESULTS); a test run without it writes nothing."""
    folder = os.environ.get("LLNM_FAULT_RESULTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
