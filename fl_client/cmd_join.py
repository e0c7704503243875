"""`llnm-site join --superlink HOST:PORT --data SITE_DIR [--name NAME]`: join a federation.

A thin wrapper that checks the site folder and then starts a real `flower-supernode` with this site's
node config. The equivalent raw command line (printed at start, and in docs/deployment.md) is:

    flower-supernode --superlink HOST:PORT --insecure \\
        --node-config 'data-path="/abs/site" site-name="NAME" cache-dir="/abs/cache"'

Node-config keys read by the ClientApp: data-path, site-name, cache-dir, device ("auto"/"cpu"/"cuda"),
privacy-state-dir, threads, and the site's privacy policy (docs/privacy.md): require-patient-dp (true:
train only when the round's patient-level DP is on), max-patient-epsilon (the lifetime budget of the site's
patients over every run), patient-delta (the site's delta, the largest a run may use), max-clipping-norm,
public-patient-count (the training-patient count the site declares public; DP-SGD is parameterised by it),
eval-splits (the splits the site evaluates on, among val,test; never train) and max-histogram-bins (the
finest score histogram an evaluate reply carries, default 100).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from fl_client.settings import (
    DEFAULT_EVAL_SPLITS,
    DEFAULT_MAX_HISTOGRAM_BINS,
    DEFAULT_PATIENT_DELTA,
    EVAL_SPLITS,
    MAX_CLIPPING_NORM,
    MAX_HISTOGRAM_BINS,
    MAX_PATIENT_EPSILON,
    PATIENT_DELTA,
    PUBLIC_PATIENT_COUNT,
    REQUIRE_PATIENT_DP,
    SiteSettingsError,
    parse_eval_splits,
    parse_histogram_bins,
    parse_positive,
)


def _eval_splits(value: str) -> str:
    try:
        return ",".join(parse_eval_splits(value))
    except SiteSettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _checked(key: str, parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type that parses like the node config and reports the flag's name."""

    def convert(value: str) -> object:
        try:
            return parse(value)
        except SiteSettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("node config ", "--")) from None

    convert.__name__ = key
    return convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", required=True, help="HOST:PORT of the consortium's SuperLink")
    p.add_argument("--data", required=True, help="this site's folder (docs/site-data.md)")
    p.add_argument("--name", help="site name (default: site.yaml's name, else the folder name)")
    p.add_argument("--cache-dir", help="where preprocessed tensors are cached (default ~/.cache/llnm-fl)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(f"--{MAX_PATIENT_EPSILON}", type=_checked(MAX_PATIENT_EPSILON,
                                                             lambda v: parse_positive(MAX_PATIENT_EPSILON, v)),
                   help="the lifetime patient-level budget of this site's patients over every run that touches "
                        "them; a round that would pass it is refused")
    p.add_argument(f"--{PATIENT_DELTA}", default=DEFAULT_PATIENT_DELTA,
                   type=_checked(PATIENT_DELTA, lambda v: parse_positive(PATIENT_DELTA, v, below_one=True)),
                   help="this site's delta: its lifetime epsilon is kept at it and a run with a larger delta is "
                        f"refused (default {DEFAULT_PATIENT_DELTA:g})")
    p.add_argument(f"--{MAX_CLIPPING_NORM}",
                   type=_checked(MAX_CLIPPING_NORM, lambda v: parse_positive(MAX_CLIPPING_NORM, v)),
                   help="the largest per-patient clipping norm (privacy.patient.max_grad_norm) this site accepts")
    p.add_argument(f"--{PUBLIC_PATIENT_COUNT}",
                   type=_checked(PUBLIC_PATIENT_COUNT, lambda v: parse_positive(PUBLIC_PATIENT_COUNT, v, int)),
                   help="the number of training patients this site declares public (e.g. rounded up); DP-SGD's "
                        "sampling rate, steps and FedAvg weight come from it (default: site.yaml's "
                        "public_patient_count, else the count rounded up to two significant digits)")
    p.add_argument(f"--{MAX_HISTOGRAM_BINS}", type=_checked(MAX_HISTOGRAM_BINS, parse_histogram_bins),
                   default=DEFAULT_MAX_HISTOGRAM_BINS,
                   help="the finest score histogram (bins on [0, 1]) an evaluate reply may carry (even; default "
                        f"{DEFAULT_MAX_HISTOGRAM_BINS})")
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
        node_config[MAX_PATIENT_EPSILON] = float(args.max_patient_epsilon)
    node_config[PATIENT_DELTA] = float(args.patient_delta)
    if args.max_clipping_norm is not None:
        node_config[MAX_CLIPPING_NORM] = float(args.max_clipping_norm)
    if args.public_patient_count is not None:
        node_config[PUBLIC_PATIENT_COUNT] = int(args.public_patient_count)
    node_config[MAX_HISTOGRAM_BINS] = int(args.max_histogram_bins)
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
