"""Helpers for the benchmarks that run real processes on loopback (SuperLink, SuperNodes, `llnm-server run`)
and watch them through /proc."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[object], log: Path) -> subprocess.Popen:
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


def rounds_of(run: Path) -> list[dict]:
    """The round records of a run directory's metrics.json so far (none while it is being written)."""
    try:
        return json.loads((run / "metrics.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


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
