"""Real processes on loopback (SuperLink, SuperNodes, `llnm-server run`) for the tests and the benchmarks.

One module for both, so that a fault test and the benchmark that times the same scenario start, stop and
watch processes the same way. Research code: nothing in the app the hospitals approve imports it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared_model.protocol.connection_check import free_local_port as free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def start(cmd: list[Any], log: Path) -> subprocess.Popen:
    """`cmd` in its own process group (so that it can be stopped with everything it started), output to `log`."""
    fh = open(log, "w")  # noqa: SIM115 - closed when the process is reaped
    return subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=ROOT)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Send `sig` to the process group; SIGKILL it if it has not ended after `timeout` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def round_records(run_dir: Path) -> list[dict]:
    """The round records of a run directory's metrics.json so far (none while it is being written)."""
    try:
        return json.loads((run_dir / "metrics.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def rounds_of(run_dir: Path) -> list[int]:
    """The numbers of the rounds recorded so far."""
    return [r["round"] for r in round_records(run_dir)]


def process_tree(pid: int) -> list[int]:
    """`pid` and every process under it."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def app_hash() -> str:
    """The SHA-256 of the app bundle `llnm-server run` submits (what sites approve)."""
    done = subprocess.run([str(BIN / "llnm-server"), "app-hash", "--json"], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    return json.loads(done.stdout)["sha256"]


class Loopback:
    """A development SuperLink on loopback (no TLS) with real `llnm-site join` processes, for fault tests.

    Every site approves the app `llnm-server app-hash` prints and keeps its state under TMP/state/SITE; logs go to
    TMP/*.log (shown when a wait times out). `close()` stops every process it started (thawing frozen ones)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.app_hash = app_hash()

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

    def wait(self, condition: Callable[[], object], what: str, timeout: float = 600) -> None:
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
