"""`llnm-server status RUN_DIR`: rounds done, the best round, why a stopped run stopped, which site trained,
refused or failed in which rounds (and why), the last round's and the final evaluation's per-site metrics, and
the privacy guarantee. `llnm-server status --provision DIR`: which sites are registered and connected now
(`fl_server.consortium_status`); with both, the consortium first."""

from __future__ import annotations

import argparse
import json
import sys

from fl_server.participation import participation, participation_lines
from fl_server.run_dir import RunDirectory


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run directory (`llnm-server run --out`)")
    p.add_argument("--provision", metavar="DIR", help="the provisioning folder: list the consortium's sites, whether "
                   "each is registered and connected to the SuperLink now, and the connections it refused")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")


def status_dict(rd: RunDirectory) -> dict:
    cfg = rd.load_config()
    metrics = rd.metrics()
    info = rd.run_info()
    rounds = metrics.get("rounds", [])
    last = rounds[-1] if rounds else None
    out = {
        "run": cfg.name,
        "run_dir": str(rd.path),
        "mode": info.get("mode"),
        "status": info.get("status"),
        "rounds_completed": rd.last_complete_round(),
        "rounds_planned": cfg.federation.rounds,
        "strategy": cfg.federation.strategy,
        "secure_aggregation": cfg.federation.secure_aggregation,
        "app_sha256": info.get("app_sha256"),
        "rejected_nodes": info.get("rejected_nodes", []),
        "refused_connections": _refused_connections(info),
        "best_round": metrics.get("best_round"),
        "stopped": {k: info.get(k) for k in ("stopped_at_round", "error", "stopped_by") if info.get(k)},
        "sites": {site: rec.to_dict() for site, rec in participation(metrics, info).items()},
        "last_round": last,
        "final": metrics.get("final"),
        "privacy": [],
    }
    if rd.privacy_path.is_file():
        from fl_server.privacy import PrivacyLedger

        out["privacy"] = PrivacyLedger.load(rd).guarantee_sentences()
    return out


def _refused_connections(info: dict) -> list[dict]:
    """Keys the SuperLink refused while this run was going: recorded in run.json when `llnm-server run` ended,
    read live from the provisioning folder while it runs."""
    from fl_server.superlink_events import read_refusals, summarise_refusals

    if info.get("status") == "running" and info.get("provision_dir"):
        return summarise_refusals(read_refusals(info["provision_dir"], since=info.get("attempt_started_at")))
    return list(info.get("refused_connections", []))


def participation_from_dicts(sites: dict) -> dict:
    from fl_server.participation import SiteParticipation

    return {name: SiteParticipation(**rec) for name, rec in sites.items()}


def run(args: argparse.Namespace) -> int:
    if args.run_dir is None and args.provision is None:
        print("error: give a run directory (llnm-server status RUN_DIR), the provisioning folder (llnm-server status "
              "--provision DIR), or both", file=sys.stderr)
        return 2
    consortium = None
    if args.provision is not None:
        from fl_server.consortium_status import consortium_lines, consortium_status
        from shared_model.config import ConfigError

        try:
            consortium = consortium_status(args.provision)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not args.json:
            print("\n".join(consortium_lines(consortium)))
    if args.run_dir is None:
        if args.json:
            print(json.dumps(consortium, indent=2))
        return 0
    rd = RunDirectory(args.run_dir)
    if not rd.exists():
        print(f"error: {rd.path}: not a run directory (no config.yaml)", file=sys.stderr)
        return 2
    s = status_dict(rd)
    if args.json:
        print(json.dumps(s if consortium is None else {**s, "consortium": consortium}, indent=2))
        return 0
    secure = ", secure aggregation" if s["secure_aggregation"] else ""
    best = f"best round {s['best_round']}" if s["best_round"] is not None else "no round evaluated yet"
    print(f"run {s['run']} ({s['mode']}, {s['strategy']}{secure}): {s['status']}, "
          f"{s['rounds_completed']}/{s['rounds_planned']} rounds complete; {best}")
    stopped = s["stopped"]
    if s["status"] != "completed" and stopped:
        where = f" at round {stopped['stopped_at_round']}" if stopped.get("stopped_at_round") else ""
        why = stopped.get("error") or stopped.get("stopped_by") or "no reason recorded"
        print(f"stopped{where}: {why}")
    for line in participation_lines(participation_from_dicts(s["sites"])):
        print(f"site {line}")
    if s["app_sha256"]:
        print(f"app: {s['app_sha256']} (what every site must have approved)")
    for node in s["rejected_nodes"]:
        print(f"refused node: {node['reason']}")
    from fl_server.superlink_events import refusal_lines

    for line in refusal_lines(s["refused_connections"]):
        print(line)
    last, final = s["last_round"], s["final"]
    if last:
        _print_entry(f"round {last['round']} ({last['split']}):", last)
    if final:
        _print_entry(f"final {final['split']} evaluation of the round-{final['round']} model ({final['model']}):",
                     final)
    elif s["status"] == "completed":
        print("final evaluation: none (federation.final_eval_split is null)")
    for sentence in s["privacy"]:
        print(f"privacy: {sentence}")
    if not s["privacy"]:
        print("privacy: no differential privacy in this run (updates and metrics are sent exactly)")
    return 0


def _print_entry(title: str, entry: dict) -> None:
    """A round's (or the final evaluation's) metrics table and its failures."""
    print(title)
    _print_metrics_table(entry)
    noisy = sorted(name for name, m in entry["sites"].items() if m.get("dp"))
    if noisy:
        print(f"  noisy: {', '.join(noisy)} answered with differentially private counts (n too is noisy; the "
              "pooled row adds them up, and '-' marks a metric the noise left undefined, e.g. a class with no "
              "patients left); docs/privacy.md, \"Evaluation under the site's control\"")
    for fail in entry.get("failures", []):
        print(f"  failed: {fail['site']} ({fail['phase']}): {fail['reason']}")


def _print_metrics_table(entry: dict) -> None:
    """The round's per-site metrics and the pooled ones, one row each."""
    from fl_server.records import is_segmentation
    from shared_model.text_table import format_table

    if is_segmentation(entry["sites"], entry.get("pooled") or {}):
        print("\n".join(format_table(*segmentation_table(entry), indent=2)))
        return

    def cell(m: dict, key: str) -> str:
        v = m.get(key)
        return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

    def ci(m: dict) -> str:
        lo, hi = m.get("auc_ci_low"), m.get("auc_ci_high")
        return f"{lo:.3f}-{hi:.3f}" if isinstance(lo, float) and isinstance(hi, float) else "-"

    rows = [[name, m.get("n", "-"), cell(m, "auc"), ci(m), cell(m, "accuracy"), cell(m, "sensitivity"),
             cell(m, "specificity")]
            for name, m in [*entry["sites"].items(), ("pooled", entry.get("pooled") or {})]]
    print("\n".join(format_table(["site", "n", "AUC", "95% CI", "acc", "sens", "spec"], rows, indent=2)))


def segmentation_table(entry: dict) -> tuple[list[str], list[list[object]]]:
    """(header, rows) of a segmentation round: per site and pooled, the views scored, each structure's mean Dice,
    IoU and HD95 (mm), and the capsule-distance error (mean absolute, share within 1 mm)."""

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "-"

    header = ["site", "views"]
    for s in ("thyroid", "nodule"):
        header += [f"{s} Dice", "IoU", "HD95 mm"]
    header += ["capsule |err| mm", "within 1 mm"]
    rows: list[list[object]] = []
    for name, m in [*entry["sites"].items(), ("pooled", entry.get("pooled") or {})]:
        row: list[object] = [name, m.get("n", "-") if name != "pooled" else (m.get("thyroid") or {}).get("n", "-")]
        for s in ("thyroid", "nodule"):
            part = m.get(s) or {}
            row += [cell(part.get("dice")), cell(part.get("iou")), cell(part.get("hd95_mm"))]
        capsule = m.get("capsule_error_mm") or {}
        row += [cell(capsule.get("mean_abs")), cell(capsule.get("within_1mm"))]
        rows.append(row)
    return header, rows
