"""`llnm-server start --provision DIR [--config CONFIG]`: run a real flower-superlink (foreground).

Secure by default: TLS with the consortium's certificates and `--enable-supernode-auth`, so only SuperNodes
whose public keys the coordinator registered (`llnm-server register-site`) can connect. Once the SuperLink
listens, every site of the provisioning folder's registry.json is registered again (the SuperLink keeps its
state in memory unless given --database). `--insecure` (plain HTTP, any node may join) is for a loopback
development SuperLink only and refuses any other host.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fl_server.config import ConfigError, load_config
from shared_model.environment import offline_environment


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provision", metavar="DIR",
                   help="provisioning folder of `llnm-server provision` (certificates, listen address, database)")
    p.add_argument("--config", help="experiment YAML; federation.superlink gives host/port/provision_dir")
    p.add_argument("--host", help="interface to listen on (default: the consortium file's superlink.listen)")
    p.add_argument("--port", type=int)
    p.add_argument("--insecure", action="store_true", default=None,
                   help="plain HTTP without SuperNode authentication: loopback development only")
    p.add_argument("--database", help="SQLite file for the SuperLink's state (default: in memory)")
    p.add_argument("--ssl-ca-certfile")
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-keyfile")
    p.add_argument("--print-command", action="store_true", help="print the flower-superlink command and exit")


def run(args: argparse.Namespace) -> int:
    from fl_server.deployment import plan_superlink

    try:
        exp = load_config(args.config) if args.config else None
        ssl = None
        if args.ssl_ca_certfile or args.ssl_certfile or args.ssl_keyfile:
            ssl = (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)
            if not all(ssl):
                raise ConfigError("TLS needs all of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
        plan = plan_superlink(exp, host=args.host, port=args.port, insecure=args.insecure, database=args.database,
                              ssl=ssl, provision_dir=args.provision)
        cmd = plan.command()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if plan.insecure:
        print(f"warning: plain HTTP on {plan.host}:{plan.port}: no TLS and any SuperNode can join "
              "(loopback development only)", file=sys.stderr)
    print(" ".join(cmd), flush=True)
    if args.print_command:
        return 0
    provision_dir = args.provision or (exp.federation.superlink.provision_dir if exp else None)
    # Flower keeps the app bundles it runs under FLWR_HOME (~/.flwr by default): with a provisioning folder,
    # they stay beside the consortium's other files instead of in the coordinator's home folder.
    home = {"FLWR_HOME": str(Path(provision_dir).resolve() / "flwr-home")} if provision_dir else {}
    env = offline_environment(PATH=_path_with_venv(), **home)
    if plan.insecure or not provision_dir:
        os.execve(cmd[0], cmd, env)
    return _supervise(cmd, env, Path(provision_dir), plan.port)


def _supervise(cmd: list[str], env: dict[str, str], provision_dir: Path, port: int) -> int:
    """Run the SuperLink in the foreground, register the consortium's sites once it listens, pass on signals."""
    import socket
    import time

    from fl_server.control import restore_registrations
    from shared_model.supervisor import Supervisor

    with Supervisor() as supervisor:
        from fl_server.superlink_events import RefusalWatch

        proc = supervisor.start(cmd, env, on_line=RefusalWatch(provision_dir))
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not supervisor.stop_asked:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.3)
        if proc.poll() is None and not supervisor.stop_asked:
            try:
                # The certificate always names 127.0.0.1, so the coordinator's tools reach it locally.
                restored = restore_registrations(provision_dir, f"127.0.0.1:{port}")
            except ConfigError as exc:
                print(f"error: registering the consortium's sites again failed: {exc}", file=sys.stderr)
            else:
                if restored:
                    print(f"[llnm] registered again: {', '.join(restored)}", flush=True)
        return supervisor.wait()


def _path_with_venv() -> str:
    """PATH with this interpreter's bin folder first: Flower starts its helper processes
    (flower-superexec, flwr-serverapp, flwr-clientapp) by name."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
