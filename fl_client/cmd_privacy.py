"""`llnm-site privacy --data SITE_DIR [--json]`: the site's lifetime privacy ledger.

Prints every run that trained on this site's patients with patient-level DP-SGD, the epsilon of each run,
the lifetime epsilon of the site's patients (every release of every run composed by the accountant, at the
site's own delta), the budget left under its ``max-patient-epsilon``, and the refusals. It reads the ledgers
in the site's privacy state folder (``--privacy-state-dir``, else ``$LLNM_PRIVACY_DIR``, else
``~/.local/share/llnm-fl/privacy``) and never writes anything.

Every ledger of the site is composed (one per set of training patients: a site whose patients changed has
several), which bounds the loss of every patient whatever ledger they are in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from fl_client.settings import (
    DEFAULT_PATIENT_DELTA,
    MAX_PATIENT_EPSILON,
    PATIENT_DELTA,
    SiteSettings,
    site_name,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="this site's folder (its name picks the ledger; never written)")
    p.add_argument("--name", help="site name (default: site.yaml's name, else the folder name), as in join")
    p.add_argument("--privacy-state-dir", help="where the site's privacy ledger is kept (as given to join)")
    p.add_argument(f"--{MAX_PATIENT_EPSILON}", type=float,
                   help="the site's lifetime budget (default: the one recorded with its last release)")
    p.add_argument(f"--{PATIENT_DELTA}", type=float,
                   help="the site's delta (default: the one recorded with its last release, else 1e-5)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def summarize(settings: SiteSettings, *, budget: float | None = None, delta: float | None = None
              ) -> dict[str, Any]:
    """The site's lifetime privacy summary from its ledgers (read only)."""
    from fl_client.privacy.history import LEGACY_FORMAT, default_state_dir, site_ledgers
    from fl_client.privacy.plan import epsilon_for, merge_history

    name = site_name(settings)
    state_dir = default_state_dir(settings).expanduser()
    ledgers: list[dict[str, Any]] = []
    releases: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []
    policy: dict[str, Any] = {}
    for path, data, rels in site_ledgers(state_dir, name):
        if data.get("format") == LEGACY_FORMAT:
            ledgers.append({"path": str(path), "data_id": None, "patients": None, "releases": len(rels),
                            "updated_at": data.get("updated_at"), "format": "version 1 (one run)"})
        else:
            policy = data.get("policy") or policy
            ledgers.append({"path": str(path), "data_id": data.get("data_id"),
                            "patients": len(data.get("patients") or []), "releases": len(rels),
                            "updated_at": data.get("updated_at")})
        refusals.extend(data.get("refusals") or [])
        releases.extend(rels)
    budget = budget if budget is not None else policy.get(MAX_PATIENT_EPSILON)
    delta = delta if delta is not None else float(policy.get(PATIENT_DELTA) or DEFAULT_PATIENT_DELTA)
    accountants = {str(r.get("accountant") or "rdp") for r in releases}
    # One accountant for the lifetime: the runs' own if they agree, else RDP (valid for every release).
    accountant = accountants.pop() if len(accountants) == 1 else "rdp"
    runs: dict[str, dict[str, Any]] = {}
    for rel in releases:
        run = runs.setdefault(str(rel["run_id"]), {"run_id": str(rel["run_id"]), "rounds": set(), "history": [],
                                                   "delta": rel.get("delta"), "accountant": rel.get("accountant"),
                                                   "first": rel.get("finished_at"), "last": rel.get("finished_at")})
        run["rounds"].add(int(rel["round"]))
        run["history"].extend(rel["history"])
        run["last"] = rel.get("finished_at") or run["last"]
    run_rows = []
    for run in runs.values():
        hist = merge_history(run["history"])
        run_delta = float(run["delta"] or delta)
        run_rows.append({
            "run_id": run["run_id"], "rounds": len(run["rounds"]), "steps": sum(n for _, _, n in hist),
            "epsilon": epsilon_for(hist, run_delta, str(run["accountant"] or accountant)), "delta": run_delta,
            "epsilon_at_site_delta": epsilon_for(hist, delta, accountant),
            "first_release": run["first"], "last_release": run["last"],
        })
    lifetime = epsilon_for([e for rel in releases for e in rel["history"]], delta, accountant)
    return {
        "site": name,
        "state_dir": str(state_dir),
        "accountant": accountant,
        "delta": delta,
        "unit": "patient",
        "adjacency": "add or remove one patient (sampling and weights from the site's public patient count)",
        "lifetime_epsilon": lifetime,
        "max_patient_epsilon": budget,
        "remaining_epsilon": None if budget is None else max(0.0, float(budget) - lifetime),
        "runs": run_rows,
        "releases": len(releases),
        "refusals": refusals,
        "ledgers": ledgers,
        "policy": policy,
    }


def format_summary(s: dict[str, Any]) -> list[str]:
    from shared_model.text_table import format_table

    lines = [f"Site {s['site']}: patient-level privacy ledger in {s['state_dir']}"]
    if not s["releases"]:
        lines.append("  No DP-SGD release recorded: this site's patients have spent epsilon 0 (under DP).")
    else:
        rows = [[r["run_id"], r["rounds"], r["steps"], f"{r['epsilon']:.4f}", f"{r['delta']:g}",
                 f"{r['epsilon_at_site_delta']:.4f}", r["last_release"] or "?"] for r in s["runs"]]
        lines += format_table(["run", "rounds", "steps", "epsilon", "at delta", f"epsilon at {s['delta']:g}",
                               "last release"], rows, indent=2)
    budget = s["max_patient_epsilon"]
    lines.append(f"  Lifetime epsilon of this site's patients: {s['lifetime_epsilon']:.4f} at delta {s['delta']:g} "
                 f"({s['accountant'].upper()} accountant, {s['releases']} release(s) in {len(s['runs'])} run(s); "
                 f"unit: patient, adjacency: {s['adjacency']}).")
    if budget is None:
        lines.append("  No lifetime budget (max-patient-epsilon) is set for this site.")
    else:
        left = s["remaining_epsilon"]
        lines.append(f"  Lifetime budget max-patient-epsilon {float(budget):g}: {left:.4f} left"
                     + (" (exhausted: training that costs privacy is refused)" if left <= 0 or math.isclose(left, 0)
                        else "") + ".")
    for ref in s["refusals"]:
        lines.append(f"  Refused: run {ref.get('run_id', '?')} round {ref.get('round', '?')} at {ref.get('at', '?')} "
                     f"({ref.get('rule', 'budget')}: would reach {float(ref.get('would_reach', math.nan)):.4f}, "
                     f"budget {ref.get('budget')}).")
    if len(s["ledgers"]) > 1:
        lines.append(f"  {len(s['ledgers'])} ledgers (the site's training patients changed); all are composed.")
    return lines


def run(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if not data.is_dir():
        print(f"error: --data {data}: not a folder", file=sys.stderr)
        return 2
    settings = SiteSettings(data_path=data, name=args.name, cache_dir=None, device="cpu", max_patient_epsilon=None,
                            privacy_state_dir=Path(args.privacy_state_dir) if args.privacy_state_dir else None)
    from fl_client.privacy.history import PrivacyStateError

    try:
        summary = summarize(settings, budget=args.max_patient_epsilon, delta=args.patient_delta)
    except (OSError, ValueError, KeyError, TypeError, PrivacyStateError) as exc:
        print(f"error: the privacy ledger of {data} cannot be read: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print("\n".join(format_summary(summary)))
    return 0
