"""Helpers for tests that run real processes (SuperLink, SuperNodes, `llnm-server run`) and federations."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fl_server.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "w")  # noqa: SIM115 - closed when the process is reaped
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def rounds_of(run_dir: Path) -> list[int]:
    m = run_dir / "metrics.json"
    if not m.is_file():
        return []
    try:
        return [r["round"] for r in json.loads(m.read_text())["rounds"]]
    except (json.JSONDecodeError, KeyError):
        return []


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


class Loopback:
    """A development SuperLink on loopback (no TLS) with real `llnm-site join` processes, for fault tests.

    Every site approves the app `llnm-server app-hash` prints and keeps its state under TMP/state/SITE; logs go to
    TMP/*.log (shown when a wait times out). `close()` stops every process it started (thawing frozen ones)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        done = subprocess.run([str(BIN / "llnm-server"), "app-hash", "--json"], capture_output=True, text=True,
                              check=True, cwd=ROOT)
        self.app_hash = json.loads(done.stdout)["sha256"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_superlink(self, log: str = "superlink.log") -> None:
        self.procs["superlink"] = start([str(BIN / "llnm-server"), "start", "--insecure", "--host", "127.0.0.1",
                                         "--port", str(self.port)], self.tmp / log)
        wait_for_port(self.port)

    def state(self, site: str) -> Path:
        return self.tmp / "state" / site

    def join(self, site: Path, *extra: str, log: str | None = None) -> subprocess.Popen:
        subprocess.run([str(BIN / "llnm-site"), "approve", self.app_hash, "--state-dir", str(self.state(site.name))],
                       check=True, capture_output=True)
        self.procs[site.name] = start([str(BIN / "llnm-site"), "join", "--superlink", self.address, "--insecure",
                                       "--data", str(site), "--state-dir", str(self.state(site.name)),
                                       "--skip-check", "--threads", "1", "--clientappio-port", str(free_port()),
                                       # Synthetic patients: exact evaluation, so the scenarios compare exact metrics.
                                       "--exact-evaluation", *extra], self.tmp / (log or f"join-{site.name}.log"))
        return self.procs[site.name]

    def run(self, config: Path, out: Path, log: str = "run.log") -> subprocess.Popen:
        self.procs["run"] = start([str(BIN / "llnm-server"), "run", "--config", str(config), "--out", str(out),
                                   "--superlink", self.address, "--insecure"], self.tmp / log)
        return self.procs["run"]

    def audit(self, site: str) -> list[dict]:
        log = self.state(site) / "audit" / f"{site}.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []

    def wait(self, condition, what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                                 for p in sorted(self.tmp.glob("*.log")))
                raise AssertionError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.3)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    continue
            stop(proc)
