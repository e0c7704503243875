"""`llnm-server report RUN_DIR`: one self-contained HTML page and its numbers as JSON (issue 14, first part).

Everything comes from what the coordinator already holds: `metrics.json` (per-round per-site metrics, the
final evaluation and the sites' final score histograms), `privacy.json` (the ledger) and `config.yaml`. No
site is contacted. The figures are drawn with matplotlib and embedded as PNG data URIs, so the page opens
offline and can be mailed as one file.

From a site's score histogram (`shared_model.evaluation.metrics.score_histogram`: per-class counts on equal bins of
[0, 1]) the per-site curves are exact at the bin edges: the ROC curve and the decision curve (net benefit) take
each edge as a threshold, and the calibration curve compares each bin's observed LLNM rate with its mid-point
(the true mean score inside a bin is within half a bin width of it).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from fl_server.report_figures import figures
from fl_server.run_dir import RunDirectory
from shared_model.evaluation.curves import histogram_curves

__all__ = ["build_report", "render_html", "write_report"]

def _baseline(path: Path) -> dict[str, Any]:
    """A run to compare with: a baseline run (`mode`, `sites`, `pooled`) or another federated run (`final`)."""
    data = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    if "final" in data:
        data = {"mode": "federated", **data["final"]}
    return {"run": path.name, "mode": data.get("mode"), "pooled_auc": (data.get("pooled") or {}).get("auc"),
            "sites": {s: m.get("auc") for s, m in (data.get("sites") or {}).items()}}


def build_report(run_dir: str | Path, compare: list[str | Path] | None = None) -> dict[str, Any]:
    """The report's numbers (what `report.json` holds); raises `FileNotFoundError` without a metrics.json."""
    rd = RunDirectory(Path(run_dir))
    if not rd.metrics_path.is_file():
        raise FileNotFoundError(f"{rd.path}: no metrics.json (is it a run directory of llnm-server run/simulate?)")
    cfg = rd.load_config()
    metrics = rd.metrics()
    rounds = metrics.get("rounds", [])
    final = metrics.get("final") or {}
    sites = sorted({s for r in rounds for s in r.get("sites", {})} | set(final.get("sites", {})))
    report: dict[str, Any] = {
        "run": cfg.name,
        "run_dir": str(rd.path),
        "outcome": cfg.preprocess.inputs.outcome,
        "strategy": cfg.federation.strategy,
        "rounds_planned": cfg.federation.rounds,
        "best_round": metrics.get("best_round"),
        "sites": sites,
        "training_curves": [{"round": r["round"], "split": r.get("split"),
                             "pooled_auc": (r.get("pooled") or {}).get("auc"),
                             "sites": {s: m.get("auc") for s, m in r.get("sites", {}).items()}} for r in rounds],
        "events": [{"round": r["round"], **f} for r in rounds for f in r.get("failures", [])]
        + [{"round": "final", **f} for f in final.get("failures", [])],
        "final": {k: final.get(k) for k in ("round", "model", "split", "sites", "pooled")} if final else None,
        "curves": {s: histogram_curves(h) for s, h in (final.get("histograms") or {}).items()},
        "privacy": [],
        "compare": [_baseline(Path(p)) for p in compare or []],
    }
    if rd.privacy_path.is_file():
        from fl_server.privacy import PrivacyLedger

        ledger = PrivacyLedger.load(rd)
        report["privacy"] = ledger.guarantee_sentences()
        report["privacy_ledger"] = _ledger_rows(ledger.data)
    final_sites = final.get("sites") or {}
    n = sum(int(m.get("n") or 0) for m in final_sites.values())
    n_pos = sum(int(m.get("n_pos") or 0) for m in final_sites.values())
    if n:
        # Treating everyone as positive depends on the prevalence alone: net benefit = p - (1 - p) t / (1 - t).
        prev = n_pos / n
        report["pooled_curve"] = {"decision": [{"threshold": t, "net_benefit_all": prev - (1 - prev) * t / (1 - t)}
                                               for t in (np.arange(1, 100) / 100).tolist()]}
    report["population"] = {s: {"n": m.get("n"), "n_pos": m.get("n_pos"),
                                "prevalence": (m["n_pos"] / m["n"]) if m.get("n") else None,
                                **(m.get("population") or {})} for s, m in final_sites.items()}
    report["risk_stage"] = {s: m["risk_stage"] for s, m in final_sites.items() if m.get("risk_stage")}
    report["explanations"] = final.get("explanations")
    from fl_server.participation import participation

    report["participation"] = {site: rec.to_dict() for site, rec in participation(metrics, rd.run_info()).items()}
    from fl_server.model_card import model_card_data

    report["model_card"] = model_card_data(rd, cfg, report)
    return report


def _ledger_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per ledger round: each site's status and epsilon in this run, and the site-level one."""
    rows = []
    for entry in data.get("rounds", []):
        sites = {name: {"status": rec.get("status"), "epsilon": rec.get("epsilon"), "delta": rec.get("delta")}
                 for name, rec in (entry.get("sites") or {}).items()}
        server = entry.get("server") or {}
        rows.append({"round": entry.get("round"), "sites": sites, "site_level_epsilon": server.get("epsilon"),
                     "site_level_delta": server.get("delta")})
    return rows


# ------------------------------------------------------------------------------------------------ HTML


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def render_html(report: dict[str, Any]) -> str:
    """The self-contained page: figures as data URIs, no script, no external resource."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>llnm-fl report: {esc(report['run'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>Run {esc(report['run'])}</h1>",
             f"<p>Outcome: {esc(report['outcome'])}. Strategy {esc(report['strategy'])}, "
             f"{report['rounds_planned']} rounds planned, best round {_cell(report['best_round'])}.</p>"]
    final = report.get("final")
    if final:
        parts.append(f"<h2>Final evaluation ({esc(str(final['split']))}, round-{final['round']} model, "
                     f"{esc(str(final['model']))})</h2>")
        keys = ("n", "n_pos", "auc", "auc_ci_low", "auc_ci_high", "sensitivity", "specificity", "ppv", "npv",
                "brier", "ece")
        parts.append("<table id='per-site'><tr><th>site</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>")
        rows = [*(final.get("sites") or {}).items(), ("pooled", final.get("pooled") or {})]
        for site, m in rows:
            parts.append(f"<tr><th>{esc(site)}</th>" + "".join(f"<td>{_cell(m.get(k))}</td>" for k in keys) + "</tr>")
        parts.append("</table><p>Threshold 0.5; AUC intervals are each site's bootstrap CI.</p>")
    for caption, uri in figures(report):
        parts.append(f"<figure><img src='{uri}' alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>")
    parts += _stage_section(report) + _explanation_section(report)
    if report["compare"]:
        parts.append("<h2>Compared runs</h2><table id='compare'><tr><th>run</th><th>mode</th><th>pooled AUC</th>"
                     + "".join(f"<th>{esc(s)}</th>" for s in report["sites"]) + "</tr>")
        for other in report["compare"]:
            parts.append(f"<tr><th>{esc(other['run'])}</th><td>{_cell(other['mode'])}</td>"
                         f"<td>{_cell(other['pooled_auc'])}</td>"
                         + "".join(f"<td>{_cell(other['sites'].get(s))}</td>" for s in report["sites"]) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Privacy</h2>")
    parts += [f"<p>{esc(line)}</p>" for line in report["privacy"]] or ["<p>No differential privacy in this run.</p>"]
    parts += _ledger_section(report)
    parts.append("<h2>Sites that failed, dropped or refused</h2>")
    if report["events"]:
        parts.append("<table id='events'><tr><th>round</th><th>site</th><th>phase</th><th>reason</th></tr>")
        for e in report["events"]:
            parts.append(f"<tr><td>{esc(str(e['round']))}</td><td>{esc(str(e.get('site')))}</td>"
                         f"<td>{esc(str(e.get('phase')))}</td><td style='text-align:left'>"
                         f"{esc(str(e.get('reason')))}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>None: every site took part in every round.</p>")
    parts += _model_card_section(report)
    parts.append("</body></html>")
    return "\n".join(parts)


def _ledger_section(report: dict[str, Any]) -> list[str]:
    rows = report.get("privacy_ledger") or []
    if not rows:
        return []
    sites = sorted({s for r in rows for s in r["sites"]})
    level = any(r["site_level_epsilon"] is not None for r in rows)
    out = ["<table id='privacy-ledger'><tr><th>round</th>" + "".join(
        f"<th>{html.escape(s)}: epsilon this run</th>" for s in sites)
        + ("<th>site-level epsilon (consortium)</th>" if level else "") + "</tr>"]
    for r in rows:
        cells = []
        for s in sites:
            rec = r["sites"].get(s)
            if rec is None:
                cells.append("<td>-</td>")
            elif rec["status"] != "trained":
                cells.append(f"<td>{html.escape(str(rec['status']))}</td>")
            else:
                cells.append(f"<td>{_cell(rec['epsilon'])}</td>")
        out.append(f"<tr><td>{r['round']}</td>" + "".join(cells)
                   + (f"<td>{_cell(r['site_level_epsilon'])}</td>" if level else "") + "</tr>")
    out.append("</table><p>Patient-level epsilons are each site's own accountant's (at the run's delta), recomputed "
               "by the coordinator from the mechanism each site reported. Each site keeps the lifetime epsilon of its "
               "patients over every run on its own disk (<code>llnm-site privacy</code>). privacy.json holds the "
               "full ledger.</p>")
    return out


def _stage_section(report: dict[str, Any]) -> list[str]:
    stages = report.get("risk_stage") or {}
    if not stages:
        return []
    k = max(len(m["auc"]) for m in stages.values())
    out = ["<h2>Risk stratification (3-class risk-stage head)</h2><table id='risk-stage'><tr><th>site</th><th>n</th>"
           + "".join(f"<th>AUC stage {c} vs rest</th>" for c in range(k)) + "<th>macro AUC</th></tr>"]
    for site, m in stages.items():
        out.append(f"<tr><th>{html.escape(site)}</th><td>{m['n']}</td>"
                   + "".join(f"<td>{_cell(a)}</td>" for a in m["auc"]) + f"<td>{_cell(m['auc_macro'])}</td></tr>")
    out.append("</table><p>One-vs-rest AUC per class at each site; '-' where the class is absent or alone. The macro "
               "AUC is the mean over the classes with an AUC.</p>")
    return out


def _explanation_section(report: dict[str, Any]) -> list[str]:
    expl = report.get("explanations")
    if not expl:
        return []
    esc = html.escape
    out = ["<h2>Explanations (computed at each site; only aggregates left the sites)</h2>",
           f"<p>Method: {esc(expl['method'])}.</p>"]
    if expl.get("shares"):
        out.append("<table id='feature-groups'><tr><th>group</th><th>share</th><th>paper group</th></tr>")
        paper_groups = expl.get("paper_groups") or {}  # absent in runs made before it was recorded
        for g, v in expl["shares"].items():
            out.append(f"<tr><th>{esc(g)}</th><td>{v:.1%}</td><td>{esc(paper_groups.get(g, '-'))}</td></tr>")
        out.append("</table><table id='paper-groups'><tr><th></th>" + "".join(
            f"<th>{esc(g)}</th>" for g in expl["paper_shares"]) + "</tr><tr><th>this model</th>" + "".join(
            f"<td>{expl['paper_group_shares'][g]:.1%}</td>" for g in expl["paper_shares"]) + "</tr><tr><th>paper</th>"
            + "".join(f"<td>{v:.1%}</td>" for v in expl["paper_shares"].values()) + "</tr></table>")
    for key, title in (("capsule", "capsule distance"), ("third", "lobe third")):
        if not expl.get(key):
            continue
        out.append(f"<h3>LLNM by {title}</h3><table id='by-{key}'><tr><th>bin</th><th>patients</th><th>LLNM</th>"
                   "<th>observed rate</th><th>mean predicted probability</th><th>predicted positive</th></tr>")
        for b in expl[key]:
            out.append(f"<tr><th>{esc(b['bin'])}</th><td>{b['n']}</td><td>{b['observed']}</td>"
                       f"<td>{_cell(b['observed_rate'])}</td><td>{_cell(b['mean_probability'])}</td>"
                       f"<td>{b['predicted']}</td></tr>")
        out.append("</table>")
    out += [f"<p>Paper: {esc(f)}.</p>" for f in expl.get("paper_findings", [])]
    out += [f"<p>{esc(s)} sent no explanation: {esc(w)}.</p>" for s, w in (expl.get("withheld") or {}).items()]
    return out


def _model_card_section(report: dict[str, Any]) -> list[str]:
    card = report.get("model_card")
    if not card:
        return []
    esc = html.escape
    out = ["<h2 id='model-card'>Model card</h2>", f"<p>{esc(card['intended_use'])}</p>",
           "<h3>Population (final evaluation split)</h3><table id='population'><tr><th>site</th><th>patients</th>"
           "<th>prevalence</th><th>views (trans/long)</th><th>thyroid masks</th><th>reports</th></tr>"]
    for site, p in card["population"].items():
        views, masks = p.get("views") or ["-", "-"], p.get("thyroid_masks") or ["-", "-"]
        out.append(f"<tr><th>{esc(site)}</th><td>{_cell(p.get('n'))}</td><td>{_cell(p.get('prevalence'))}</td>"
                   f"<td>{views[0]}/{views[1]}</td><td>{masks[0]}/{masks[1]}</td><td>{_cell(p.get('reports'))}</td></tr>")
    perf = card["performance"]
    out.append(f"</table><p>Worst site: {esc(str(perf['worst_site']))} (AUC {_cell(perf['worst_auc'])}).</p>")
    out.append("<h3>Known limitations</h3><ul>" + "".join(f"<li>{esc(s)}</li>" for s in card["limitations"])
               + "</ul><h3>Hashes (SHA-256)</h3><ul>")
    h = card["hashes"]
    out.append(f"<li>checkpoint {esc(str(h['checkpoint']))}: <code>{esc(str(h['checkpoint_sha256']))}</code></li>")
    out += [f"<li>{esc(k)}: <code>{esc(str(v))}</code></li>" for k, v in h["encoders"].items()]
    out.append("</ul><p>The full card is model_card.md in the run directory.</p>")
    return out


def write_report(run_dir: str | Path, compare: list[str | Path] | None = None) -> tuple[Path, Path]:
    """Write `RUN_DIR/report.json`, `RUN_DIR/report.html` and `RUN_DIR/model_card.md`; returns the first two."""
    from fl_server.model_card import render_model_card
    from shared_model.fileio import atomic_write_json, atomic_write_text

    run = Path(run_dir)
    rd = RunDirectory(run)
    cfg = rd.load_config() if rd.metrics_path.is_file() else None
    if cfg is not None and cfg.task == "segment":
        from fl_server.segmentation_report import (
            build_segmentation_report,
            render_segmentation_card,
            render_segmentation_html,
        )

        report = build_segmentation_report(rd, cfg, dict(rd.metrics()), compare)
        card, page = render_segmentation_card(report["run"], report["model_card"]), render_segmentation_html(report)
    else:
        report = build_report(run_dir, compare)
        card, page = render_model_card(report["run"], report["model_card"]), render_html(report)
    atomic_write_text(run / "model_card.md", card)
    atomic_write_json(run / "report.json", report)
    atomic_write_text(run / "report.html", page)
    return run / "report.json", run / "report.html"
