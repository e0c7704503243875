"""`llnm-server run --config CONFIG --out RUN_DIR [--superlink HOST:PORT]`: launch on a deployment."""

from __future__ import annotations

import argparse
import sys

from fl_server.config import ConfigError
from fl_server.run_dir import NothingToResume, RunDirectory, experiment_for, start_error_exit_code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="run directory on this (the coordinator's) machine")
    p.add_argument("--superlink", help="HOST:PORT of the SuperLink (default: federation.superlink)")
    p.add_argument("--root-certificates", help="CA certificate of a TLS SuperLink")
    p.add_argument("--resume", action="store_true", help="continue the run in --out if it exists")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")


def launch(rd: RunDirectory, address: str, root_certificates: str | None) -> int:
    from fl_server.deployment import submit_run

    exp = rd.load_config()
    rc = submit_run(exp, rd, address, insecure=root_certificates is None, root_certificates=root_certificates)
    info = rd.run_info()
    if info.get("status") != "completed":
        error = str(info.get("error", ""))
        # The error says itself when resuming cannot help (sites that refused under their own policy).
        advice = "" if "resum" in error else f"; continue with `llnm-server resume {rd.path}`"
        print(f"error: run did not complete (status {info.get('status')}): {error} -- see {rd.log_path}{advice}",
              file=sys.stderr)
        return rc or 1
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        rd = RunDirectory(args.out)
        exp, resuming = experiment_for(rd, resume=args.resume, config=args.config, overrides=args.set)
        link = exp.federation.superlink
        address = args.superlink or f"{link.host if link.host != '0.0.0.0' else '127.0.0.1'}:{link.port}"
        if not resuming:
            rd.create(exp, {"mode": "deployment", "superlink": address, "status": "created",
                            "root_certificates": args.root_certificates})
    except (NothingToResume, ConfigError) as exc:
        return start_error_exit_code(exc)
    return launch(rd, address, args.root_certificates)
