"""`llnm-site join --kit DIR --key FILE --data SITE_DIR`: join a federation.

Checks the site folder, checks that the SuperLink speaks TLS with the consortium's certificate, and then
starts a real `flower-supernode` that authenticates with the site's own key (registered by the coordinator
under the kit's site name) and runs every ClientApp behind the site's app gate (`fl_client.app_gate`:
only approved apps run; everything sent is in the audit log). The equivalent raw command line (printed at
start, and in docs/deployment.md) is:

    PATH=STATE_DIR/bin:$PATH flower-supernode --superlink HOST:PORT --root-certificates KIT/ca.crt \\
        --auth-supernode-private-key KEY \\
        --node-config 'data-path="/abs/site" site-name="NAME" cache-dir="/abs/cache"'

`--insecure` (plain HTTP, no node authentication) is for a loopback development SuperLink only.

Node-config keys read by the ClientApp: data-path, site-name, cache-dir, device ("auto"/"cpu"/"cuda"),
privacy-state-dir, threads, and the site's privacy policy (docs/privacy.md): require-patient-dp (true:
train only when the round's patient-level DP is on), max-patient-epsilon (the lifetime budget of the site's
patients over every run), patient-delta (the site's delta, the largest a run may use), max-clipping-norm,
public-patient-count (the training-patient count the site declares public; DP-SGD is parameterised by it),
eval-splits (the splits the site evaluates on, among val,test; never train), max-histogram-bins (the
finest score histogram an evaluate reply carries, default 100), share-explanations (false: never send the
explanation aggregates a final evaluation with evaluation.explain asks for), the floor under the coordinator's
DP-SGD settings (max-run-epsilon, min-noise-multiplier; with max-patient-epsilon each implies
require-patient-dp), require-secure-aggregation, and the evaluation replies' privacy (eval-epsilon per reply,
max-eval-epsilon over the site's lifetime, or exact-evaluation, which leaves validation and test patients
unprotected; min-cell-count for explanation cells). docs/privacy.md has the recommended policy.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fl_client.settings import (
    DEFAULT_EVAL_EPSILON,
    DEFAULT_EVAL_SPLITS,
    DEFAULT_MAX_EVAL_EPSILON,
    DEFAULT_MAX_HISTOGRAM_BINS,
    DEFAULT_MIN_CELL_COUNT,
    DEFAULT_PATIENT_DELTA,
    DP_FLOOR_KEYS,
    EVAL_EPSILON,
    EVAL_SPLITS,
    EXACT_EVALUATION,
    MAX_CLIPPING_NORM,
    MAX_EVAL_EPSILON,
    MAX_HISTOGRAM_BINS,
    MAX_PATIENT_EPSILON,
    MAX_RUN_EPSILON,
    MIN_CELL_COUNT,
    MIN_NOISE_MULTIPLIER,
    PATIENT_DELTA,
    PUBLIC_PATIENT_COUNT,
    REQUIRE_PATIENT_DP,
    REQUIRE_SECURE_AGGREGATION,
    SHARE_EXPLANATIONS,
    SiteSettings,
    SiteSettingsError,
    parse_eval_splits,
    parse_histogram_bins,
    parse_positive,
    render_node_config,
)
from shared_model.supervisor import Supervisor


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
    p.add_argument("--kit", help="the onboarding kit from the coordinator (llnm-server provision): the SuperLink "
                                 "address, the CA certificate and this site's registered name")
    p.add_argument("--key", "--auth-key", dest="auth_key",
                   help="this site's private key (llnm-site keygen); its .pub is what the coordinator registered")
    p.add_argument("--superlink", help="HOST:PORT of the consortium's SuperLink (default: the kit's)")
    p.add_argument("--data", required=True, help="this site's folder (docs/site-data.md)")
    p.add_argument("--name", help="site name (default: the kit's; without a kit site.yaml's name, else the "
                                  "folder name)")
    p.add_argument("--state-dir", help="the site's state folder: approved apps, audit log, privacy ledger "
                                       "(default $LLNM_SITE_STATE_DIR, else ~/.local/share/llnm-fl)")
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
    p.add_argument(f"--{MAX_RUN_EPSILON}", type=_checked(MAX_RUN_EPSILON, lambda v: parse_positive(MAX_RUN_EPSILON, v)),
                   help="the largest epsilon one run may spend on this site's training patients (a larger "
                        "target_epsilon, or a round past it, is refused; implies --require-patient-dp)")
    p.add_argument(f"--{MIN_NOISE_MULTIPLIER}",
                   type=_checked(MIN_NOISE_MULTIPLIER, lambda v: parse_positive(MIN_NOISE_MULTIPLIER, v)),
                   help="the smallest DP-SGD noise multiplier this site trains with, whatever the coordinator's "
                        "target (implies --require-patient-dp)")
    p.add_argument(f"--{REQUIRE_PATIENT_DP}", action="store_true",
                   help="refuse to train unless the round's patient-level DP (privacy.patient) is on (implied by "
                        f"--{MAX_PATIENT_EPSILON}, --{MAX_RUN_EPSILON} and --{MIN_NOISE_MULTIPLIER})")
    p.add_argument(f"--{REQUIRE_SECURE_AGGREGATION}", action="store_true",
                   help="train only inside secure-aggregation (SecAgg+) rounds, so that no update leaves unmasked")
    p.add_argument(f"--{EVAL_EPSILON}", default=DEFAULT_EVAL_EPSILON,
                   type=_checked(EVAL_EPSILON, lambda v: parse_positive(EVAL_EPSILON, v)),
                   help=f"epsilon of one evaluate reply (noisy score histogram; default {DEFAULT_EVAL_EPSILON:g})")
    p.add_argument(f"--{MAX_EVAL_EPSILON}", default=DEFAULT_MAX_EVAL_EPSILON,
                   type=_checked(MAX_EVAL_EPSILON, lambda v: parse_positive(MAX_EVAL_EPSILON, v)),
                   help="lifetime budget of every evaluation reply on this site's patients (default "
                        f"{DEFAULT_MAX_EVAL_EPSILON:g}); further evaluations are refused")
    p.add_argument(f"--{EXACT_EVALUATION}", action="store_true",
                   help="answer evaluations exactly (no noise): the validation and test patients are then NOT "
                        "protected, and `llnm-site privacy` lists every such reply")
    p.add_argument(f"--{MIN_CELL_COUNT}", default=DEFAULT_MIN_CELL_COUNT,
                   type=_checked(MIN_CELL_COUNT, lambda v: parse_positive(MIN_CELL_COUNT, v, int)),
                   help="explanation cells over fewer patients are suppressed (default "
                        f"{DEFAULT_MIN_CELL_COUNT})")
    p.add_argument(f"--{EVAL_SPLITS}", type=_eval_splits, default=",".join(DEFAULT_EVAL_SPLITS),
                   help="comma-separated splits this site evaluates on, among val,test (never train; "
                        "default val,test); other evaluate requests are refused")
    p.add_argument(f"--no-{SHARE_EXPLANATIONS}", dest="share_explanations", action="store_false",
                   help="never send explanation aggregates (feature-group shares, counts by capsule distance and "
                        "lobe third) when the coordinator's final evaluation asks for them")
    p.add_argument("--keep-sent", action="store_true",
                   help="keep a copy of every reply exactly as it leaves the site, in the state folder's sent/ "
                        "(for `llnm-site audit --scan-sent`; a full model update per round, so mind the disk)")
    p.add_argument("--privacy-state-dir", help="where the site's DP accountant history is kept")
    p.add_argument("--threads", type=int, help="CPU threads for local training (default: torch's default)")
    p.add_argument("--root-certificates", help="CA certificate of a TLS SuperLink (instead of --kit)")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP without node authentication: a loopback development SuperLink only")
    p.add_argument("--clientappio-port", type=int,
                   help="local port of the SuperNode's Runtime API for its ClientApp processes (default: 9094 if "
                        "free, else a free port; several SuperNodes on one machine each need their own)")
    p.add_argument("--skip-check", action="store_true", help="do not validate the site folder first")
    p.add_argument("--skip-probe", action="store_true",
                   help="do not check the SuperLink's transport (TLS or plain) before starting")
    p.add_argument("--print-command", action="store_true", help="print the flower-supernode command and exit")
    p.add_argument("--max-restarts", type=int, default=20,
                   help="start the SuperNode again this many times when it stops unasked, e.g. after a SuperLink "
                        "restart (default 20; 0: never)")


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
    import socket

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
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            chosen = int(s.getsockname()[1])
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


REFUSED_HINT = ("the SuperLink refused this SuperNode ('Failed to activate SuperNode'): this site's key is not "
                "registered there, or was revoked. Send the .pub made by `llnm-site keygen` to the coordinator "
                "(`llnm-server register-site`)")
ENDED_HINT = ("the SuperNode kept stopping without being asked to: the SuperLink ended its session (its key may have "
              "been revoked; ask the coordinator) or is down. Run `llnm-site join` again once it is back")


def run(args: argparse.Namespace) -> int:
    from shared_model.config import ConfigError

    site = Path(args.data)
    if not site.is_dir():
        print(f"error: --data {site}: not a folder", file=sys.stderr)
        return 2
    try:
        plan = plan_join(args)
        local_port(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.skip_check and not args.print_command:
        from shared_model.sitedata.check import check_site

        report = check_site(site, deep=False)
        if not report.usable:
            print(report.format_text(), file=sys.stderr)
            print(f"error: {site} has errors; fix them (llnm-site check {site}) before joining", file=sys.stderr)
            return 1
    cmd = supernode_command(args, plan)
    floors = floor_flags(args)
    if floors and not args.require_patient_dp:
        print(f"note: {', '.join(floors)} implies --{REQUIRE_PATIENT_DP}: rounds without patient-level DP are "
              "refused", file=sys.stderr)
    env = _environment(args, plan)
    print(pasteable_command(env, cmd), flush=True)
    if args.print_command:
        return 0
    if not args.skip_probe:
        from shared_model.protocol.connection_check import probe_superlink

        probe = probe_superlink(plan.superlink, ca_file=Path(plan.root_certificates) if plan.root_certificates
                                else None)
        advice = {"down": "the SuperNode will keep retrying until the SuperLink is up",
                  "server-uses-tls": "join with the consortium's kit (--kit DIR --key FILE) or --root-certificates "
                                     "CA.crt",
                  "server-is-plain": "ask the coordinator to start it with `llnm-server start --provision DIR`, or "
                                     "join a loopback development SuperLink with --insecure",
                  "untrusted-certificate": "ask the coordinator for a fresh kit"}
        text = f"{probe.message}; {advice.get(probe.kind, 'see the error above')}"
        if not probe.ok:
            print(f"error: {text}", file=sys.stderr)
            return 2
        if probe.kind == "down":
            print(f"warning: {text}", file=sys.stderr)
    _warn_if_nothing_approved(plan)
    return _run_supernode(cmd, env, max_restarts=args.max_restarts)


def _environment(args: argparse.Namespace, plan: JoinPlan) -> dict[str, str]:
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


def _warn_if_nothing_approved(plan: JoinPlan) -> None:
    from fl_client.site_state import SiteStateError, approvals_path, load_approvals

    try:
        approved = load_approvals(plan.state_dir)
    except SiteStateError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        return
    if not approved:
        print(f"warning: no app is approved in {approvals_path(plan.state_dir)}: every message will be refused "
              "until you approve the coordinator's app (llnm-site approve HASH)", file=sys.stderr)


def _run_supernode(cmd: list[str], env: dict[str, str], max_restarts: int = 20) -> int:
    """Run flower-supernode in the foreground (its output relayed) and keep the site in the federation: when
    the SuperNode stops without being asked to (the SuperLink restarted, the network dropped), start it again
    after a growing pause, saying why; a refusal of the site's key ends it with what to do. Ctrl-C/SIGTERM are
    passed on and end it."""
    with Supervisor() as supervisor:
        restarts = refusals = 0
        while True:
            watch = _SupernodeWatch()
            rc = supervisor.run(cmd, env, on_line=watch)
            if supervisor.stop_asked:
                return 0
            if watch.port_taken:
                port = cmd[cmd.index("--port") + 1] if "--port" in cmd else str(DEFAULT_LOCAL_PORT)
                print(f"error: flower-supernode could not open its local Runtime API port {port}: the address is "
                      "already in use (another SuperNode or program on this machine took it). Join again with a "
                      "free --clientappio-port, or without the flag to let join pick one", file=sys.stderr)
                return rc or 1
            if watch.refused:
                refusals += 1
                # Right after a SuperLink restart its registrations are being restored: a refusal then is worth
                # a few more tries. A refusal at the very first start is final.
                if restarts == 0 or refusals > 3:
                    print(f"error: flower-supernode exited (status {rc}): {REFUSED_HINT}", file=sys.stderr)
                    return rc or 1
            if restarts >= max_restarts:
                print(f"error: flower-supernode exited (status {rc}) {restarts + 1} times: {ENDED_HINT}",
                      file=sys.stderr)
                return rc or 1
            restarts += 1
            pause = min(60, 2 ** restarts)
            print(f"[llnm-site] flower-supernode stopped without being asked to (status {rc}): the SuperLink "
                  f"restarted or the connection dropped. Starting it again in {pause} s (restart {restarts} of at "
                  f"most {max_restarts}; Ctrl-C to stop).", file=sys.stderr, flush=True)
            if not supervisor.sleep(pause):
                return 0


class _SupernodeWatch:
    """What flower-supernode's output says about why it ended."""

    def __init__(self) -> None:
        self.refused = self.port_taken = False

    def __call__(self, line: str) -> None:
        if "Failed to activate SuperNode" in line:
            self.refused = True
        if "address already in use" in line.lower():
            self.port_taken = True
