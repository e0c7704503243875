"""`llnm-site privacy --data SITE_DIR [--state-dir DIR] [--json]`: what every run has cost this site's patients.

Reads the site's privacy records (never writes): its DP-SGD ledgers (`fl_client.privacy.history`) and its
record of runs and evaluation releases (`fl_client.privacy.site_record`), in the privacy folder
``--privacy-state-dir``, else ``privacy/`` of ``--state-dir`` (as given to `llnm-site join`), else
``$LLNM_PRIVACY_DIR``, else ``privacy/`` of ``$LLNM_SITE_STATE_DIR``, else ``~/.local/share/llnm-fl/privacy``.

It prints every run the site took part in, with or without DP: the epsilon each run spent on the training
patients, the rounds a run trained *without* DP (whose training patients that run left unprotected), the
evaluation replies (DP, with their epsilon, or exact, whose patients they left unprotected), the lifetime
epsilon of the training patients (every DP-SGD release of every run, at the site's delta), the lifetime
epsilon of the evaluated patients, the budgets left, and the refusals. A privacy folder that does not exist is
an error (exit 2), and a folder with no record of this site says so loudly (exit 1): neither is "epsilon 0".
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
    MAX_EVAL_EPSILON,
    MAX_PATIENT_EPSILON,
    PATIENT_DELTA,
    SiteSettings,
    site_name,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="this site's folder (its name picks the records; never written)")
    p.add_argument("--name", help="site name (default: site.yaml's name, else the folder name), as in join")
    p.add_argument("--state-dir", help="the site's state folder, as given to join (its privacy/ holds the records; "
                                       "default $LLNM_SITE_STATE_DIR, else ~/.local/share/llnm-fl)")
    p.add_argument("--privacy-state-dir", help="the privacy folder itself, if join was given one")
    p.add_argument(f"--{MAX_PATIENT_EPSILON}", type=float,
                   help="the site's lifetime budget (default: the one recorded with its last release)")
    p.add_argument(f"--{PATIENT_DELTA}", type=float,
                   help="the site's delta (default: the one recorded with its last release, else 1e-5)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def privacy_folder(args: argparse.Namespace) -> Path:
    """Where join put this site's privacy records (the same rule as `llnm-site join` and the ClientApp)."""
    from fl_client.privacy.history import default_state_dir

    if args.privacy_state_dir:
        return Path(args.privacy_state_dir).expanduser()
    if args.state_dir:
        return Path(args.state_dir).expanduser() / "privacy"
    return default_state_dir(None).expanduser()


def summarize(settings: SiteSettings, *, budget: float | None = None, delta: float | None = None
              ) -> dict[str, Any]:
    """The site's privacy summary from its records (read only)."""
    from fl_client.privacy.history import LEGACY_FORMAT, default_state_dir, site_ledgers
    from fl_client.privacy.site_record import RECORD_FORMAT, SiteRecord, record_path
    from shared_model.dp_accounting import epsilon_for, merge_history

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
                            "withheld": len(data.get("withheld") or []), "updated_at": data.get("updated_at")})
        refusals.extend(data.get("refusals") or [])
        releases.extend(rels)
    record = (SiteRecord.load_or_create(state_dir, name).data if record_path(state_dir, name).is_file()
              else {"format": RECORD_FORMAT, "runs": {}, "evaluations": [], "refusals": []})
    refusals.extend(record.get("refusals") or [])
    budget = budget if budget is not None else policy.get(MAX_PATIENT_EPSILON)
    delta = delta if delta is not None else float(policy.get(PATIENT_DELTA) or DEFAULT_PATIENT_DELTA)
    accountants = {str(r.get("accountant") or "rdp") for r in releases}
    # One accountant for the lifetime: the runs' own if they agree, else RDP (valid for every release).
    accountant = accountants.pop() if len(accountants) == 1 else "rdp"
    runs: dict[str, dict[str, Any]] = {}

    def run_row(run_id: str) -> dict[str, Any]:
        return runs.setdefault(run_id, {"run_id": run_id, "rounds": set(), "history": [], "delta": None,
                                        "accountant": None, "first": None, "last": None, "unprotected_rounds": [],
                                        "exact_evaluations": [], "dp_evaluations": 0, "eval_history": []})

    for rel in releases:
        run = run_row(str(rel["run_id"]))
        run["rounds"].add(int(rel["round"]))
        run["history"].extend(rel["history"])
        run["delta"], run["accountant"] = rel.get("delta"), rel.get("accountant")
        run["first"] = run["first"] or rel.get("finished_at")
        run["last"] = rel.get("finished_at") or run["last"]
    for run_id, entry in record["runs"].items():
        run = run_row(str(run_id))
        run["first"] = run["first"] or entry.get("first")
        run["last"] = max(filter(None, [run["last"], entry.get("last")]), default=None)
        run["unprotected_rounds"] = list(entry.get("unprotected_rounds") or [])
        run["exact_evaluations"] = list(entry.get("exact_evaluations") or [])
        run["explained"] = entry.get("explained")
    for rel in record["evaluations"]:
        run = run_row(str(rel["run_id"]))
        run["dp_evaluations"] += 1
        run["eval_history"].extend(rel["history"])
    eval_history = [e for rel in record["evaluations"] for e in rel["history"]]
    run_rows = []
    for run in sorted(runs.values(), key=lambda r: str(r["first"] or "")):
        hist = merge_history(run["history"])
        run_delta = float(run["delta"] or delta)
        unprotected = run["unprotected_rounds"]
        exact = run["exact_evaluations"]
        run_rows.append({
            "run_id": run["run_id"],
            "dp_rounds": len(run["rounds"]), "steps": sum(n for _, _, n in hist),
            "epsilon": epsilon_for(hist, run_delta, str(run["accountant"] or accountant)) if hist else None,
            "delta": run_delta if hist else None,
            "epsilon_at_site_delta": epsilon_for(hist, delta, accountant) if hist else None,
            "unprotected_rounds": [u["round"] for u in unprotected],
            "unprotected_training_patients": max((int(u["patients"]) for u in unprotected), default=0),
            "dp_evaluations": run["dp_evaluations"],
            "eval_epsilon": epsilon_for(run["eval_history"], delta, "rdp") if run["eval_history"] else None,
            "exact_evaluations": [{"round": e["round"], "split": e["split"], "patients": e["patients"]}
                                  for e in exact],
            "explained": run.get("explained"),
            "first": run["first"], "last": run["last"],
        })
    training = [e for rel in releases for e in rel["history"]]
    lifetime = epsilon_for(training, delta, accountant)
    eval_lifetime = epsilon_for(eval_history, delta, "rdp")
    eval_budget = policy.get(MAX_EVAL_EPSILON)
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
        "evaluation_epsilon": eval_lifetime,
        "max_eval_epsilon": eval_budget,
        "remaining_eval_epsilon": None if eval_budget is None else max(0.0, float(eval_budget) - eval_lifetime),
        # A patient who moved between the training and the evaluation splits (a new split) spent both.
        "any_role_epsilon": epsilon_for([*training, *eval_history], delta, "rdp"),
        "runs": run_rows,
        "releases": len(releases),
        "evaluation_releases": len(record["evaluations"]),
        "refusals": refusals,
        "ledgers": ledgers,
        "policy": policy,
    }


def format_summary(s: dict[str, Any]) -> list[str]:
    from shared_model.text_table import format_rounds, format_table

    lines = [f"Site {s['site']}: privacy records in {s['state_dir']}"]
    if s["runs"]:
        def eps(v: Any) -> str:
            return "-" if v is None else f"{v:.4f}"

        rows = [[r["run_id"], r["dp_rounds"], eps(r["epsilon"]), eps(r["epsilon_at_site_delta"]),
                 format_rounds(r["unprotected_rounds"]), r["dp_evaluations"], eps(r["eval_epsilon"]),
                 len(r["exact_evaluations"]) or "-", r["last"] or "?"] for r in s["runs"]]
        lines += format_table(["run", "DP rounds", "epsilon", f"at {s['delta']:g}", "rounds without DP",
                               "DP evals", "eval epsilon", "exact evals", "last"], rows, indent=2)
        for r in s["runs"]:
            if r["unprotected_rounds"]:
                lines.append(f"  ! run {r['run_id']} trained without DP in {len(r['unprotected_rounds'])} round(s) "
                             f"({format_rounds(r['unprotected_rounds'])}): its "
                             f"{r['unprotected_training_patients']} training patients are NOT protected by that run.")
            by_split: dict[str, list[dict[str, Any]]] = {}
            for e in r["exact_evaluations"]:
                by_split.setdefault(e["split"], []).append(e)
            for split, evals in by_split.items():
                lines.append(f"  ! run {r['run_id']} evaluated {split} exactly in {len(evals)} repl(ies) (round(s) "
                             f"{format_rounds([e['round'] for e in evals])}): its "
                             f"{max(e['patients'] for e in evals)} {split} patients are NOT protected by them.")
    lines.append(f"  Training patients: lifetime epsilon {s['lifetime_epsilon']:.4f} at delta {s['delta']:g} "
                 f"({s['accountant'].upper()} accountant, {s['releases']} DP-SGD release(s); unit: patient, "
                 f"adjacency: {s['adjacency']}).")
    budget = s["max_patient_epsilon"]
    if budget is None:
        lines.append("  No lifetime training budget (max-patient-epsilon) is set for this site.")
    else:
        left = s["remaining_epsilon"]
        lines.append(f"  Lifetime budget max-patient-epsilon {float(budget):g}: {left:.4f} left"
                     + (" (exhausted: training that costs privacy is refused)" if left <= 0 or math.isclose(left, 0)
                        else "") + ".")
    lines.append(f"  Evaluated patients: lifetime epsilon {s['evaluation_epsilon']:.4f} at delta {s['delta']:g} "
                 f"({s['evaluation_releases']} DP evaluation release(s), RDP accountant)"
                 + (f"; budget max-eval-epsilon {float(s['max_eval_epsilon']):g}, "
                    f"{s['remaining_eval_epsilon']:.4f} left." if s["max_eval_epsilon"] is not None else "."))
    lines.append(f"  A patient who was in both the training and an evaluated split: epsilon at most "
                 f"{s['any_role_epsilon']:.4f}.")
    for ref in s["refusals"]:
        reach = ref.get("would_reach")
        lines.append(f"  Refused: run {ref.get('run_id', '?')} round {ref.get('round', '?')} at {ref.get('at', '?')} "
                     f"({ref.get('rule', 'budget')}"
                     + (f": would reach {float(reach):.4f}" if reach is not None else "")
                     + f", budget {ref.get('budget')}).")
    if len(s["ledgers"]) > 1:
        lines.append(f"  {len(s['ledgers'])} DP-SGD ledgers (the site's training patients changed); all are composed.")
    return lines


def run(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if not data.is_dir():
        print(f"error: --data {data}: not a folder", file=sys.stderr)
        return 2
    folder = privacy_folder(args)
    if not folder.is_dir():
        print(f"error: the privacy folder {folder} does not exist. Give the --state-dir (or --privacy-state-dir) "
              "this site joined with: without its records nothing can be said about what its patients have spent "
              "(it is NOT zero)", file=sys.stderr)
        return 2
    settings = SiteSettings(data_path=data, name=args.name, cache_dir=None, device="cpu", max_patient_epsilon=None,
                            privacy_state_dir=folder)
    from fl_client.privacy.history import PrivacyStateError

    try:
        summary = summarize(settings, budget=args.max_patient_epsilon, delta=args.patient_delta)
    except (OSError, ValueError, KeyError, TypeError, PrivacyStateError) as exc:
        print(f"error: the privacy records of {data} cannot be read: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print("\n".join(format_summary(summary)))
    if not summary["runs"] and not summary["refusals"]:
        print(f"WARNING: {folder} holds no record of site {summary['site']!r}: it never trained or evaluated with "
              "this privacy folder, or this is not the folder it joined with (check --state-dir and --name). Its "
              "patients' spending is unknown here, not zero.", file=sys.stderr)
        return 1
    return 0
