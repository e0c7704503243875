"""`llnm-site audit [--name SITE] [--state-dir DIR] [--json] [--scan-sent --data SITE_DIR]`: what this site
sent, run by run.

Summarises the site's append-only audit log (written by the app gate, `fl_client.app_gate`) by the
coordinator's experiment (a stopped and resumed experiment is one entry with several Flower runs): the app
hash, the messages received and replies sent by kind, the parameters and bytes sent, the names of the metrics
that left, the privacy spent the replies reported, and every refusal once (refused apps included).

`--scan-sent --data SITE_DIR` instead looks for the site's patients (ids, report text, pixels, preprocessed
tensors) in the copies of every reply kept with `llnm-site join --keep-sent` (`fl_client.sent_messages`),
and exits 1 when it finds any.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="site name (default: the only audit log in the state folder)")
    p.add_argument("--state-dir", help="the site's state folder (default $LLNM_SITE_STATE_DIR, else "
                                       "~/.local/share/llnm-fl)")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.add_argument("--scan-sent", action="store_true",
                   help="look for this site's patients in the replies kept with `join --keep-sent` (needs --data)")
    p.add_argument("--data", help="with --scan-sent: the site's data folder")
    p.add_argument("--cache-dir", help="with --scan-sent: the site's cache folder (its preprocessed tensors are "
                                       "looked for too; default as for join)")


def summarise(path: Path) -> dict[str, Any]:
    """The audit log by the coordinator's experiment: its Flower runs (a stopped and resumed experiment has
    several), app hashes, messages received and replies sent by kind, what the replies carried, and every
    refusal once (a refused app's own entry, not the error reply that carried it)."""
    from fl_client.site_state import read_audit

    runs: dict[str, dict[str, Any]] = {}
    refused_apps: list[dict[str, Any]] = []
    malformed: list[int] = []
    entries = 0
    lines = list(read_audit(path))
    # Messages that name no experiment (a SecAgg+ stage, an older coordinator's query) belong to the experiment
    # their Flower run carries elsewhere.
    named = {e.get("run_id"): e["experiment"] for _, e, _ in lines if e and e.get("experiment")}
    for line_no, entry, _raw in lines:
        if entry is None:
            malformed.append(line_no)
            continue
        entries += 1
        event = entry.get("event")
        experiment = entry.get("experiment") or named.get(entry.get("run_id"))
        if event == "refused-app":
            refused_apps.append({**{k: entry.get(k) for k in ("time", "run_id", "app_hash", "message_type",
                                                              "round")}, "experiment": experiment})
        key = str(experiment) if experiment else f"flower-run-{entry.get('run_id', '?')}"
        run = runs.setdefault(key, {
            "experiment": experiment, "flower_runs": [], "app_hashes": [], "first": entry.get("time"),
            "last": entry.get("time"), "received": Counter(), "sent": Counter(), "rounds": set(),
            "parameters_sent": 0, "bytes_sent": 0, "metric_names": set(), "privacy": {}, "refusals": [],
            "errors": 0})
        run["last"] = entry.get("time")
        if entry.get("run_id") is not None and entry["run_id"] not in run["flower_runs"]:
            run["flower_runs"].append(entry["run_id"])
        if entry.get("app_hash") and entry["app_hash"] not in run["app_hashes"]:
            run["app_hashes"].append(entry["app_hash"])
        kind = str(entry.get("message_type", "?"))
        if entry.get("round") is not None:
            run["rounds"].add(int(entry["round"]))
        if event == "received":
            run["received"][kind] += 1
        elif event == "sent":
            run["sent"][kind] += 1
            run["parameters_sent"] += int(entry.get("parameters", 0) or 0)
            run["bytes_sent"] += int(entry.get("array_bytes", 0) or 0) + int(entry.get("config_bytes", 0) or 0)
            run["metric_names"].update(entry.get("metric_names", []))
            for metric, value in (entry.get("privacy") or {}).items():
                run["privacy"][metric] = value  # the latest reply's cumulative figures
            if entry.get("error"):
                run["errors"] += 1
        elif event in ("refused", "refused-app"):
            run["refusals"].append({"time": entry.get("time"), "round": entry.get("round"), "kind": kind,
                                    "by": "app gate" if event == "refused-app" else "ClientApp",
                                    "reason": _short(entry.get("reason") or entry.get("error") or "")})
    out_runs = []
    for run in runs.values():
        out_runs.append({**run, "received": dict(run["received"]), "sent": dict(run["sent"]),
                         "rounds": sorted(run["rounds"]), "metric_names": sorted(run["metric_names"])})
    return {"file": str(path), "entries": entries, "runs": out_runs, "refused_apps": refused_apps,
            "malformed_lines": malformed}


def _short(text: str) -> str:
    from shared_model import protocol

    for marker in (protocol.POLICY_REFUSAL_MARKER, protocol.REFUSAL_MARKER):
        at = text.find(marker)
        if at >= 0:
            text = text[at:]
            break
    return text.split("'>", 1)[0][:300]


def _pick_log(root: Path, name: str | None) -> Path:
    from fl_client.site_state import AUDIT_DIR, audit_path

    if name:
        return audit_path(root, name)
    logs = sorted((root / AUDIT_DIR).glob("*.jsonl"))
    if len(logs) == 1:
        return logs[0]
    if not logs:
        raise FileNotFoundError(f"no audit log in {root / AUDIT_DIR} (nothing joined with this state folder yet)")
    raise FileNotFoundError(f"{len(logs)} audit logs in {root / AUDIT_DIR}: give --name "
                            f"({', '.join(p.stem for p in logs)})")


def run(args: argparse.Namespace) -> int:
    from fl_client.site_state import state_root

    try:
        path = _pick_log(state_root(args.state_dir), args.name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no audit log for this site yet")
        if args.scan_sent:
            return _scan(args, state_root(args.state_dir), path.stem)
        summary = summarise(path)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"audit log {summary['file']}: {summary['entries']} entries, {len(summary['runs'])} experiment(s)")
    for run in summary["runs"]:
        hashes = ", ".join(h[:16] for h in run["app_hashes"]) or "-"
        flower = ", ".join(str(r) for r in run["flower_runs"]) or "-"
        print(f"experiment {run['experiment'] or '(not named)'}  Flower run(s) {flower}  app {hashes}  "
              f"{run['first']} .. {run['last']}")
        print(f"  received {dict(sorted(run['received'].items()))}  replies sent {dict(sorted(run['sent'].items()))}"
              f"  refusals {len(run['refusals'])}  rounds {run['rounds'] or '-'}")
        print(f"  sent {run['parameters_sent']} parameters, {run['bytes_sent']} bytes of payload; metrics: "
              f"{', '.join(run['metric_names']) or '-'}")
        if run["privacy"]:
            print("  privacy reported: " + ", ".join(f"{k} {v:g}" for k, v in sorted(run["privacy"].items())))
        for r in run["refusals"]:
            where = f" round {r['round']}" if r["round"] is not None else ""
            print(f"  REFUSED ({r['by']}) {r['kind']}{where} at {r['time']}: {r['reason']}")
    if summary["malformed_lines"]:
        print(f"warning: lines {summary['malformed_lines']} of {summary['file']} are not JSON", file=sys.stderr)
    return 0


def _scan(args: argparse.Namespace, root: Path, site: str) -> int:
    from fl_client.sent_messages import scan_sent

    if not args.data:
        print("error: --scan-sent needs --data SITE_DIR (the folder whose patients are looked for)", file=sys.stderr)
        return 2
    result = scan_sent(root, site, Path(args.data), Path(args.cache_dir) if args.cache_dir else None)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['kept_messages']} kept repl(ies) of {site} scanned for {result['patient_ids']} patient ids "
              f"and {result['needles']} pieces of report text, pixels and tensors from {result['data']}")
        for f in result["findings"]:
            where = f" at byte {f['offset']}" if f["offset"] is not None else ""
            print(f"FOUND {f['what']} in {f['file']}{where}")
        if not result["findings"]:
            print("nothing of the site's patients found")
    if result["kept_messages"] == 0:
        print(f"warning: no kept replies for {site}: join with --keep-sent to keep them", file=sys.stderr)
    return 1 if result["findings"] else 0
