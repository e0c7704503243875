"""`llnm-server report RUN_DIR`: one self-contained HTML page and its numbers as JSON (issue 14, first part).

Everything comes from what the coordinator already holds: `metrics.json` (per-round per-site metrics, the
final evaluation and the sites' final score histograms), `privacy.json` (the ledger) and `config.yaml`. No
site is contacted. The figures are drawn with matplotlib and embedded as PNG data URIs, so the page opens
offline and can be mailed as one file.

From a site's score histogram (`shared_model.metrics.score_histogram`: per-class counts on equal bins of
[0, 1]) the per-site curves are exact at the bin edges: the ROC curve and the decision curve (net benefit) take
each edge as a threshold, and the calibration curve compares each bin's observed LLNM rate with its mid-point
(the true mean score inside a bin is within half a bin width of it).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from fl_server.run_dir import RunDirectory

__all__ = ["build_report", "histogram_curves", "render_html", "write_report"]

#: Calibration bins drawn from a histogram (its bins are merged into this many, when finer).
CALIBRATION_BINS = 10


def histogram_curves(hist: dict[str, Any]) -> dict[str, Any]:
    """ROC, calibration and decision-curve points of one site's score histogram."""
    from shared_model.metrics import dense_counts

    k = int(hist["n_bins"])
    pos = dense_counts(hist, "pos", k, "score histogram").astype(float)
    neg = dense_counts(hist, "neg", k, "score histogram").astype(float)
    n_pos, n_neg = pos.sum(), neg.sum()
    # Threshold at edge j/k: predicted positive when score >= j/k, i.e. bins j..k-1.
    tp = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
    fp = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])
    thresholds = np.arange(k + 1) / k
    roc = {"fpr": (fp / n_neg).tolist() if n_neg else None, "tpr": (tp / n_pos).tolist() if n_pos else None}
    merge = k // CALIBRATION_BINS if k % CALIBRATION_BINS == 0 and k >= CALIBRATION_BINS else 1
    m = k // merge
    cal_pos = pos.reshape(m, merge).sum(axis=1)
    cal_all = cal_pos + neg.reshape(m, merge).sum(axis=1)
    calibration = {
        "mid_predicted": ((np.arange(m) + 0.5) / m).tolist(),
        "observed_rate": [float(p / a) if a else None for p, a in zip(cal_pos, cal_all, strict=True)],
        "counts": cal_all.astype(int).tolist(),
    }
    n = n_pos + n_neg
    decision = []
    for j in range(1, k):
        pt = thresholds[j]
        odds = pt / (1 - pt)
        decision.append({"threshold": float(pt),
                         "net_benefit_model": float(tp[j] / n - fp[j] / n * odds) if n else None,
                         "net_benefit_all": float(n_pos / n - n_neg / n * odds) if n else None})
    return {"roc": roc, "calibration": calibration, "decision": decision, "n": int(n), "n_pos": int(n_pos)}


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

        report["privacy"] = PrivacyLedger.load(rd).guarantee_sentences()
    return report


# ------------------------------------------------------------------------------------------------ HTML


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figures(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, data URI) of every figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    curves = report["training_curves"]
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        xs = [c["round"] for c in curves]
        for site in report["sites"]:
            ax.plot(xs, [c["sites"].get(site) for c in curves], marker=".", linewidth=1, label=site)
        ax.plot(xs, [c["pooled_auc"] for c in curves], color="black", linewidth=2.5, label="pooled")
        ax.set(xlabel="round", ylabel=f"AUC ({curves[0]['split']})", title="Training curves")
        ax.legend(fontsize=7, ncol=2)
        figures.append(("Per-site and pooled AUC per round", _png(fig)))
    if report["curves"]:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for site, c in report["curves"].items():
            if c["roc"]["fpr"] is not None and c["roc"]["tpr"] is not None:
                axes[0].plot(c["roc"]["fpr"], c["roc"]["tpr"], linewidth=1, label=site)
            cal = [(x, y) for x, y in zip(c["calibration"]["mid_predicted"], c["calibration"]["observed_rate"],
                                          strict=True) if y is not None]
            if cal:
                axes[1].plot(*zip(*cal, strict=True), marker="o", linewidth=1, label=site)
            dec = [d for d in c["decision"] if d["net_benefit_model"] is not None]
            axes[2].plot([d["threshold"] for d in dec], [d["net_benefit_model"] for d in dec], linewidth=1,
                         label=site)
        axes[0].plot([0, 1], [0, 1], color="grey", linestyle=":")
        axes[0].set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (final model)")
        axes[1].plot([0, 1], [0, 1], color="grey", linestyle=":")
        axes[1].set(xlabel="predicted risk (bin mid-point)", ylabel="observed rate", title="Calibration")
        axes[2].axhline(0.0, color="grey", linestyle=":")
        axes[2].set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve", ylim=(-0.05, None))
        for ax in axes:
            ax.legend(fontsize=7)
        figures.append(("Per-site curves of the final model, from the sites' score histograms", _png(fig)))
    return figures


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
    for caption, uri in _figures(report):
        parts.append(f"<figure><img src='{uri}' alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>")
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
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, compare: list[str | Path] | None = None) -> tuple[Path, Path]:
    """Write `RUN_DIR/report.json` and `RUN_DIR/report.html`; returns their paths."""
    from shared_model.fileio import atomic_write_json, atomic_write_text

    report = build_report(run_dir, compare)
    run = Path(run_dir)
    atomic_write_json(run / "report.json", report)
    atomic_write_text(run / "report.html", render_html(report))
    return run / "report.json", run / "report.html"
