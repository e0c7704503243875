"""`llnm-server run --config CONFIG --out RUN_DIR --provision DIR`: launch on a deployment.

`flwr run` reaches the SuperLink's control API over TLS, checking its certificate against the consortium's
CA (`--provision DIR`, or `--root-certificates CA.crt`); `--insecure` only for a loopback development
SuperLink.
"""

from __future__ import annotations

import argparse
import sys

from fl_server.config import ConfigError
from fl_server.run_dir import NothingToResume, RunDirectory, experiment_for, start_error_exit_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="run directory on this (the coordinator's) machine")
    p.add_argument("--provision", metavar="DIR", help="provisioning folder: the CA and the SuperLink address")
    p.add_argument("--superlink", help="HOST:PORT of the SuperLink (default: the consortium's, else "
                                       "federation.superlink)")
    p.add_argument("--root-certificates", help="CA certificate of a TLS SuperLink (instead of --provision)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to a loopback development SuperLink")
    p.add_argument("--resume", action="store_true", help="continue the run in --out if it exists")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")


def launch(rd: RunDirectory, conn: object) -> int:
    from fl_server.deployment import ControlConnection, submit_run

    assert isinstance(conn, ControlConnection)
    from pathlib import Path

    from shared_model.protocol.connection_check import probe_superlink

    probe = probe_superlink(conn.address, ca_file=Path(conn.root_certificates) if conn.root_certificates else None)
    advice = {"down": "start it first (`llnm-server start --provision DIR`) or check --superlink",
              "server-uses-tls": "use --provision DIR (or --root-certificates CA.crt) instead of --insecure",
              "server-is-plain": "start the SuperLink with `llnm-server start --provision DIR`"}
    if probe.kind != "ok":
        print(f"error: {probe.message}; {advice.get(probe.kind, 'check the provisioning folder')}", file=sys.stderr)
        return 2
    exp = rd.load_config()
    rc = submit_run(exp, rd, conn)
    info = rd.run_info()
    if info.get("status") != "completed":
        error = str(info.get("error", "")) or f"flwr run exited with status {rc} before the ServerApp recorded why"
        # The error says itself when resuming cannot help (sites that refused under their own policy).
        advice = "" if "resum" in error else f"; continue with `llnm-server resume {rd.path}`"
        print(f"error: run did not complete (status {info.get('status')}): {error} -- see {rd.log_path}{advice}",
              file=sys.stderr)
        return rc or 1
    return 0


def run(args: argparse.Namespace) -> int:
    from fl_server.deployment import control_connection

    try:
        rd = RunDirectory(args.out)
        exp, resuming = experiment_for(rd, resume=args.resume, config=args.config, overrides=args.set)
        conn = control_connection(exp, superlink=args.superlink, provision_dir=args.provision,
                                  root_certificates=args.root_certificates, insecure=args.insecure)
        if not resuming:
            rd.create(exp, {"mode": "deployment", "superlink": conn.address, "status": "created",
                            "root_certificates": conn.root_certificates, "insecure": conn.insecure,
                            "provision_dir": conn.provision_dir})
    except (NothingToResume, ConfigError) as exc:
        return start_error_exit_code(exc)
    return launch(rd, conn)
