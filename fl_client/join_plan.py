"""What `llnm-site join` will start, worked out before anything starts: the SuperLink and its certificate, the
site's key and name (`plan_join`), the local port of the SuperNode's Runtime API (`local_port`), the site's
settings as node config (`site_settings`, rendered by `fl_client.settings`), the `flower-supernode` command
and its environment (the site's app gate first on PATH)."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from fl_client.settings import DP_FLOOR_KEYS, SiteSettings, render_node_config

__all__ = ["DEFAULT_LOCAL_PORT", "JoinPlan", "PortTaken", "floor_flags", "local_port",
           "pasteable_command", "plan_join", "site_settings", "supernode_command", "supernode_environment",
           "warn_if_nothing_approved"]


def floor_flags(args: argparse.Namespace) -> list[str]:
    """The DP-floor flags given (each implies --require-patient-dp)."""
    return [f"--{k}" for k in DP_FLOOR_KEYS if getattr(args, k.replace("-", "_"), None) is not None]


@dataclass(frozen=True)
class JoinPlan:
    """Where and how this site connects, resolved from the kit and the flags."""

    superlink: str
    root_certificates: str | None
    auth_key: str | None
    name: str
    state_dir: Path


def plan_join(args: argparse.Namespace) -> JoinPlan:
    """Secure by default: a kit (or a CA certificate) and the site's key; plain HTTP only on loopback."""
    from fl_client.site_state import check_outside, state_root
    from shared_model.config import ConfigError
    from shared_model.protocol.connection_check import is_loopback, split_address
    from shared_model.protocol.site_kit import check_site_private_key, load_kit

    superlink, ca, name = args.superlink, args.root_certificates, args.name
    if args.kit:
        kit = load_kit(args.kit)
        if args.name and args.name != kit.site:
            raise ConfigError(f"--name {args.name} differs from the kit's site {kit.site!r}: the coordinator "
                              f"registered this site's key as {kit.site!r}, and a SuperNode claiming another name "
                              "is refused")
        superlink, name = superlink or kit.superlink, kit.site
        if ca and Path(ca).resolve() != kit.ca_cert:
            raise ConfigError("--root-certificates and --kit name different CA certificates; use the kit's")
        ca = str(kit.ca_cert)
    if not superlink:
        raise ConfigError("give --kit DIR (from the coordinator) or --superlink HOST:PORT")
    try:
        host, _ = split_address(superlink)
    except ValueError as exc:
        raise ConfigError(f"--superlink {exc}") from None
    if args.insecure:
        if ca or args.auth_key:
            raise ConfigError("--insecure cannot be combined with --kit, --root-certificates or --key: node "
                              "authentication needs TLS")
        if not is_loopback(host):
            raise ConfigError(f"--insecure joins in plain HTTP without node authentication, for a loopback "
                              f"development SuperLink only; {host} is not loopback. Join with the consortium's "
                              "kit: --kit DIR --key FILE")
    elif not ca:
        raise ConfigError("a SuperNode connects with TLS: give --kit DIR (or --root-certificates CA.crt) and --key "
                          "FILE; --insecure only for a loopback development SuperLink")
    elif not args.auth_key:
        raise ConfigError("--key FILE is required with TLS: the consortium's SuperLink admits only SuperNodes whose "
                          "key was registered (make one with `llnm-site keygen`, send the .pub to the coordinator)")
    if args.auth_key:
        check_site_private_key(Path(args.auth_key))
    state = state_root(args.state_dir)
    check_outside(state, Path(args.data))
    return JoinPlan(superlink, ca, str(Path(args.auth_key).resolve()) if args.auth_key else None,
                    name or _default_name(Path(args.data)), state)


#: Flower's default port for the SuperNode's local Runtime API (where each ClientApp process fetches its message).
DEFAULT_LOCAL_PORT = 9094


class PortTaken(ValueError):
    """The local port the SuperNode needs is in use."""


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def local_port(args: argparse.Namespace) -> int:
    """The SuperNode's local Runtime API port: `--clientappio-port`, which must be free, else Flower's 9094 if
    free, else a free one (several SuperNodes on one machine each need their own; chosen once per join)."""
    chosen = getattr(args, "_local_port", None)
    if chosen is not None:
        return int(chosen)
    if args.clientappio_port:
        if not _free(args.clientappio_port):
            raise PortTaken(f"--clientappio-port {args.clientappio_port} is taken on this machine (another "
                            "SuperNode, or another program): choose a free one, or leave the flag out and join picks "
                            "one")
        chosen = int(args.clientappio_port)
    elif _free(DEFAULT_LOCAL_PORT):
        chosen = DEFAULT_LOCAL_PORT
    else:
        from shared_model.protocol.connection_check import free_local_port

        chosen = free_local_port()
        print(f"note: port {DEFAULT_LOCAL_PORT} (the SuperNode's local Runtime API) is taken on this machine, most "
              f"likely by another SuperNode; this one uses {chosen} (--clientappio-port sets it)", file=sys.stderr)
    args._local_port = chosen
    return chosen



def site_settings(args: argparse.Namespace, plan: JoinPlan) -> SiteSettings:
    """The site's settings as its flags give them (what the SuperNode's node config will hold)."""
    # The privacy folder is always named, so that `llnm-site privacy --state-dir` finds what the ClientApp writes.
    privacy = Path(args.privacy_state_dir) if args.privacy_state_dir else plan.state_dir / "privacy"
    return SiteSettings(
        data_path=Path(args.data).resolve(), name=plan.name,
        cache_dir=Path(args.cache_dir).resolve() if args.cache_dir else None, device=args.device,
        max_patient_epsilon=args.max_patient_epsilon, privacy_state_dir=privacy.resolve(),
        threads=int(args.threads) if args.threads else None,
        require_patient_dp=bool(args.require_patient_dp) or bool(floor_flags(args)),
        eval_splits=tuple(str(args.eval_splits).split(",")), patient_delta=float(args.patient_delta),
        max_clipping_norm=args.max_clipping_norm, public_patient_count=args.public_patient_count,
        max_histogram_bins=int(args.max_histogram_bins), share_explanations=bool(args.share_explanations),
        max_run_epsilon=args.max_run_epsilon, min_noise_multiplier=args.min_noise_multiplier,
        require_secure_aggregation=bool(args.require_secure_aggregation), eval_epsilon=float(args.eval_epsilon),
        max_eval_epsilon=float(args.max_eval_epsilon), exact_evaluation=bool(args.exact_evaluation),
        min_cell_count=int(args.min_cell_count))


def supernode_command(args: argparse.Namespace, plan: JoinPlan) -> list[str]:
    node_config = site_settings(args, plan).to_node_config()
    exe = Path(sys.executable).parent / "flower-supernode"
    cmd = [str(exe) if exe.exists() else (shutil.which("flower-supernode") or "flower-supernode"),
           "--superlink", plan.superlink]
    if plan.root_certificates:
        cmd += ["--root-certificates", plan.root_certificates]
    else:
        cmd.append("--insecure")
    if plan.auth_key:
        cmd += ["--auth-supernode-private-key", plan.auth_key]
    cmd += ["--port", str(local_port(args))]
    cmd += ["--node-config", render_node_config(node_config)]
    return cmd


def supernode_environment(args: argparse.Namespace, plan: JoinPlan) -> dict[str, str]:
    """The SuperNode's environment: the site's gate first on PATH (it stands in for flwr-clientapp), and the
    state folder and site name the gate records under."""
    from fl_client.app_gate import write_launcher
    from fl_client.sent_messages import ENV_KEEP_SENT
    from fl_client.site_state import ENV_SITE_NAME, ENV_STATE_DIR
    from shared_model.environment import offline_environment

    gate_bin = plan.state_dir / "bin"
    if not args.print_command:
        write_launcher(gate_bin)
    path = os.pathsep.join([str(gate_bin), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    keep = {ENV_KEEP_SENT: "1"} if getattr(args, "keep_sent", False) else {}
    return offline_environment(PATH=path, **{ENV_STATE_DIR: str(plan.state_dir),
                                             ENV_SITE_NAME: plan.name}, **keep)


def pasteable_command(env: dict[str, str], cmd: list[str]) -> str:
    """The command as one line a shell runs as is: every variable it needs that differs from this environment
    (the site's state folder and name, the offline switches), the PATH with the app gate first, then the
    quoted command."""
    changed = {k: v for k, v in env.items() if k != "PATH" and os.environ.get(k) != v}
    assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(changed.items())]
    gate = env["PATH"].split(os.pathsep)[0]
    return " ".join(["env", *assignments, f'PATH={shlex.quote(gate)}:"$PATH"', shlex.join(cmd)])


def _default_name(site: Path) -> str:
    """site.yaml's `name`, else the folder name (what the ClientApp would report without --name)."""
    import yaml

    try:
        meta = yaml.safe_load((site / "site.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        meta = None
    name = meta.get("name") if isinstance(meta, dict) else None
    return str(name) if name else site.resolve().name


def warn_if_nothing_approved(plan: JoinPlan) -> None:
    from fl_client.site_state import SiteStateError, approvals_path, load_approvals

    try:
        approved = load_approvals(plan.state_dir)
    except SiteStateError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        return
    if not approved:
        print(f"warning: no app is approved in {approvals_path(plan.state_dir)}: every message will be refused "
              "until you approve the coordinator's app (llnm-site approve HASH)", file=sys.stderr)
