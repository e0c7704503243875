"""`llnm-site join --superlink HOST:PORT --data SITE_DIR [--name NAME]`: join a federation.

A thin wrapper that checks the site folder and then starts a real `flower-supernode` with this site's
node config. The equivalent raw command line (printed at start, and in docs/deployment.md) is:

    flower-supernode --superlink HOST:PORT --insecure \\
        --node-config 'data-path="/abs/site" site-name="NAME" cache-dir="/abs/cache"'

Node-config keys read by the ClientApp: data-path, site-name, cache-dir, device ("auto"/"cpu"/"cuda"),
max-patient-epsilon (the site's own patient-level budget), privacy-state-dir, and the site's policy:
require-patient-dp (true: train only when the round's patient-level DP is on) and eval-splits (the splits
the site evaluates on, comma-separated among val,test; never train).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from fl_client.settings import (
    DEFAULT_EVAL_SPLITS,
    EVAL_SPLITS,
    REQUIRE_PATIENT_DP,
    SiteSettingsError,
    parse_eval_splits,
)


def _eval_splits(value: str) -> str:
    try:
        return ",".join(parse_eval_splits(value))
    except SiteSettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", required=True, help="HOST:PORT of the consortium's SuperLink")
    p.add_argument("--data", required=True, help="this site's folder (docs/site-data.md)")
    p.add_argument("--name", help="site name (default: site.yaml's name, else the folder name)")
    p.add_argument("--cache-dir", help="where preprocessed tensors are cached (default ~/.cache/llnm-fl)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-patient-epsilon", type=float,
                   help="this site's own patient-level privacy budget; training beyond it is refused")
    p.add_argument(f"--{REQUIRE_PATIENT_DP}", action="store_true",
                   help="refuse to train unless the round's patient-level DP (privacy.patient) is on")
    p.add_argument(f"--{EVAL_SPLITS}", type=_eval_splits, default=",".join(DEFAULT_EVAL_SPLITS),
                   help="comma-separated splits this site evaluates on, among val,test (never train; "
                        "default val,test); other evaluate requests are refused")
    p.add_argument("--privacy-state-dir", help="where the site's DP accountant history is kept")
    p.add_argument("--threads", type=int, help="CPU threads for local training (default: torch's default)")
    p.add_argument("--root-certificates", help="CA certificate of a TLS SuperLink (omit for --insecure)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (test networks only)")
    p.add_argument("--auth-key", help="OpenSSH EC private key for SuperNode authentication (TLS only)")
    p.add_argument("--clientappio-port", type=int, help="local port of the SuperNode's ClientApp API")
    p.add_argument("--skip-check", action="store_true", help="do not validate the site folder first")
    p.add_argument("--print-command", action="store_true", help="print the flower-supernode command and exit")


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def supernode_command(args: argparse.Namespace) -> list[str]:
    site = Path(args.data).resolve()
    node_config: dict[str, object] = {"data-path": str(site)}
    if args.name:
        node_config["site-name"] = args.name
    if args.cache_dir:
        node_config["cache-dir"] = str(Path(args.cache_dir).resolve())
    if args.device != "auto":
        node_config["device"] = args.device
    if args.max_patient_epsilon is not None:
        node_config["max-patient-epsilon"] = float(args.max_patient_epsilon)
    if args.privacy_state_dir:
        node_config["privacy-state-dir"] = str(Path(args.privacy_state_dir).resolve())
    if args.threads:
        node_config["threads"] = int(args.threads)
    node_config[REQUIRE_PATIENT_DP] = bool(args.require_patient_dp)
    node_config[EVAL_SPLITS] = str(args.eval_splits)
    exe = Path(sys.executable).parent / "flower-supernode"
    cmd = [str(exe) if exe.exists() else (shutil.which("flower-supernode") or "flower-supernode"),
           "--superlink", args.superlink]
    if args.root_certificates:
        cmd += ["--root-certificates", args.root_certificates]
    else:
        cmd.append("--insecure")
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", args.auth_key]
    if args.clientappio_port:
        cmd += ["--port", str(args.clientappio_port)]
    cmd += ["--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())]
    return cmd


def run(args: argparse.Namespace) -> int:
    site = Path(args.data)
    if not site.is_dir():
        print(f"error: --data {site}: not a folder", file=sys.stderr)
        return 2
    if args.auth_key and not args.root_certificates:
        print("error: --auth-key needs TLS (--root-certificates)", file=sys.stderr)
        return 2
    if not args.skip_check and not args.print_command:
        from shared_model.site_check import check_site

        report = check_site(site, deep=False)
        if not report.usable:
            print(report.format_text(), file=sys.stderr)
            print(f"error: {site} has errors; fix them (llnm-site check {site}) before joining", file=sys.stderr)
            return 1
    cmd = supernode_command(args)
    print(" ".join(cmd), flush=True)
    if args.print_command:
        return 0
    from shared_model.environment import offline_environment

    os.execve(cmd[0], cmd, offline_environment(PATH=_path_with_venv()))
    return 0  # not reached


def _path_with_venv() -> str:
    """PATH with this interpreter's bin folder first: Flower starts its helper processes
    (flower-superexec, flwr-serverapp, flwr-clientapp) by name."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
