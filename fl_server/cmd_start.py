"""`llnm-server start [--config CONFIG]`: run a real flower-superlink (foreground)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fl_server.config import ConfigError, load_config
from shared_model.environment import offline_environment


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML; federation.superlink gives host/port/insecure")
    p.add_argument("--host", help="interface to listen on (0.0.0.0 to accept remote sites)")
    p.add_argument("--port", type=int)
    p.add_argument("--insecure", action="store_true", default=None, help="plain HTTP (test networks only)")
    p.add_argument("--database", help="SQLite file for the SuperLink's state")
    p.add_argument("--ssl-ca-certfile")
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-keyfile")
    p.add_argument("--print-command", action="store_true", help="print the flower-superlink command and exit")


def run(args: argparse.Namespace) -> int:
    from fl_server.deployment import superlink_command

    try:
        exp = load_config(args.config) if args.config else None
        ssl = None
        if args.ssl_ca_certfile or args.ssl_certfile or args.ssl_keyfile:
            ssl = (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)
            if not all(ssl):
                raise ConfigError("TLS needs all of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
        cmd = superlink_command(exp, host=args.host, port=args.port,
                                insecure=False if ssl else args.insecure, database=args.database, ssl=ssl)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(" ".join(cmd), flush=True)
    if args.print_command:
        return 0
    env = offline_environment(PATH=_path_with_venv())
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def _path_with_venv() -> str:
    """PATH with this interpreter's bin folder first: Flower starts its helper processes
    (flower-superexec, flwr-serverapp, flwr-clientapp) by name."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
