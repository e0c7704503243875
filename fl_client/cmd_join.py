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

The node-config keys (the site's data, caches and privacy policy) are defined once, in `fl_client.settings`;
docs/privacy.md has the recommended policy. What join will start is worked out by `fl_client.join_plan`, and
`fl_client.supernode_runner` keeps the SuperNode running.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from fl_client.join_plan import (
    floor_flags,
    local_port,
    pasteable_command,
    plan_join,
    supernode_command,
    supernode_environment,
    warn_if_nothing_approved,
)
from fl_client.settings import (
    DEFAULT_EVAL_EPSILON,
    DEFAULT_EVAL_SPLITS,
    DEFAULT_MAX_EVAL_EPSILON,
    DEFAULT_MAX_HISTOGRAM_BINS,
    DEFAULT_MIN_CELL_COUNT,
    DEFAULT_PATIENT_DELTA,
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
    SiteSettingsError,
    parse_eval_splits,
    parse_histogram_bins,
    parse_positive,
)
from fl_client.supernode_runner import run_supernode


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
    env = supernode_environment(args, plan)
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
    warn_if_nothing_approved(plan)
    from shared_model.protocol.connection_check import free_local_port

    return run_supernode(cmd, env, max_restarts=args.max_restarts,
                         repick_port=None if args.clientappio_port else free_local_port)
