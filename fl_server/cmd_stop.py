"""`llnm-server stop RUN_DIR`: stop a running experiment, wherever its ServerApp runs.

A deployment run is stopped on its SuperLink with Flower's `flwr stop RUN_ID` (the run id the ServerApp
recorded in run.json, through the run directory's own Flower connection), which ends the ServerApp and
tells the sites; a simulation run is stopped by signalling the process that holds the run directory (its
pid is in RUN_DIR/lock.json). Either way run.json then says `stopped`, with who stopped it, and
`llnm-server resume RUN_DIR` continues from the last complete round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from fl_server.run_dir import RunDirectory


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the run to let go (default 60)")


def stop_local_holder(rd: RunDirectory) -> tuple[bool, str]:
    """SIGTERM to the process on this machine that holds the run directory (a simulation)."""
    try:
        holder = json.loads(rd.holder_path.read_text(encoding="utf-8"))
        pid = int(holder["pid"])
    except (OSError, ValueError, KeyError):
        return False, "no live process holds the run directory"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False, f"process {pid} (lock.json) is gone"
    return True, f"sent SIGTERM to process {pid}"


def _released(rd: RunDirectory, timeout: float) -> bool:
    from fl_server.run_dir import RunInUse

    deadline = time.monotonic() + timeout
    while True:
        try:
            rd.ensure_not_running()
            return True
        except RunInUse:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    rd = RunDirectory(args.run_dir)
    if not rd.run_info_path.is_file():
        print(f"error: {rd.path} is not a run directory (no run.json)", file=sys.stderr)
        return 2
    info = rd.run_info()
    if info.get("status") in ("completed", "stopped") and _released(rd, 0):
        print(f"{rd.path}: nothing to stop (status {info.get('status')})")
        return 0
    if info.get("mode") == "deployment":
        from fl_server.deployment import stop_deployment_run

        ok, what = stop_deployment_run(rd, info)
    else:
        ok, what = stop_local_holder(rd)
    print(what)
    if not ok and not _released(rd, 0):
        print(f"error: could not stop the run in {rd.path}: {what}", file=sys.stderr)
        return 1
    if not _released(rd, args.timeout):
        print(f"error: the run in {rd.path} still holds its directory after {args.timeout:.0f} s", file=sys.stderr)
        return 1
    rd.update_run_info(status="stopped", stopped_by="llnm-server stop")
    print(f"stopped; continue with `llnm-server resume {rd.path}`")
    return 0
