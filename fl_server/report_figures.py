"""The report's figures (matplotlib, embedded as PNG data URIs so the page opens offline).

Each function takes `fl_server.report.build_report`'s numbers and returns (caption, data URI) pairs; nothing
here reads a file.
"""

from __future__ import annotations

import base64
import io
from typing import Any

__all__ = ["figures"]


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _training(report: dict[str, Any], plt: Any) -> list[tuple[str, str]]:
    curves = report["training_curves"]
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = [c["round"] for c in curves]
    for site in report["sites"]:
        ax.plot(xs, [c["sites"].get(site) for c in curves], marker=".", linewidth=1, label=site)
    ax.plot(xs, [c["pooled_auc"] for c in curves], color="black", linewidth=2.5, label="pooled")
    ax.set(xlabel="round", ylabel=f"AUC ({curves[0]['split']})", title="Training curves")
    ax.legend(fontsize=7, ncol=2)
    return [("Per-site and pooled AUC per round", _png(fig))]


def _site_curves(report: dict[str, Any], plt: Any) -> list[tuple[str, str]]:
    if not report["curves"]:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    treat_all = None
    for site, c in report["curves"].items():
        if c["roc"]["fpr"] is not None and c["roc"]["tpr"] is not None:
            axes[0].plot(c["roc"]["fpr"], c["roc"]["tpr"], linewidth=1, label=site)
        cal = [(x, y) for x, y in zip(c["calibration"]["mid_predicted"], c["calibration"]["observed_rate"],
                                      strict=True) if y is not None]
        if cal:
            axes[1].plot(*zip(*cal, strict=True), marker="o", linewidth=1, label=site)
        dec = [d for d in c["decision"] if d["net_benefit_model"] is not None]
        axes[2].plot([d["threshold"] for d in dec], [d["net_benefit_model"] for d in dec], linewidth=1, label=site)
    pooled = report.get("pooled_curve")
    if pooled:
        dec = [d for d in pooled["decision"] if d["net_benefit_all"] is not None]
        treat_all = ([d["threshold"] for d in dec], [d["net_benefit_all"] for d in dec])
    axes[0].plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes[0].set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (final model)")
    axes[1].plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes[1].set(xlabel="predicted risk (bin mid-point)", ylabel="observed rate", title="Calibration")
    axes[2].axhline(0.0, color="grey", linestyle=":", label="treat none")
    if treat_all is not None:
        axes[2].plot(*treat_all, color="black", linestyle="--", linewidth=1, label="treat all (pooled)")
    axes[2].set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve", ylim=(-0.05, None))
    for ax in axes:
        ax.legend(fontsize=7)
    return [("Per-site curves of the final model, from the sites' score histograms", _png(fig))]


def _explanations(report: dict[str, Any], plt: Any) -> list[tuple[str, str]]:
    expl = report.get("explanations")
    if not expl:
        return []
    out = []
    if expl.get("paper_group_shares"):
        import numpy as np

        groups = list(expl["paper_shares"])
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        x = np.arange(len(groups))
        ax.bar(x - 0.2, [expl["paper_group_shares"][g] for g in groups], 0.4, label="this model (sites' mean)")
        ax.bar(x + 0.2, [expl["paper_shares"][g] for g in groups], 0.4, label="LLNM-Net paper")
        ax.set_xticks(x, groups)
        ax.set(ylabel="share of attribution", title="Feature-group shares")
        ax.legend(fontsize=8)
        out.append(("Feature-group shares (integrated gradients, averaged over sites) beside the paper's", _png(fig)))
    locations = [(k, t) for k, t in (("capsule", "capsule distance"), ("third", "lobe third")) if expl.get(k)]
    if locations:
        fig, axes = plt.subplots(1, len(locations), figsize=(6.2 * len(locations), 3.4), squeeze=False)
        for ax, (key, title) in zip(axes[0], locations, strict=True):
            bins = expl[key]
            labels = [f"{b['bin']}\n(n={b['n']})" for b in bins]
            ax.plot(labels, [b["observed_rate"] for b in bins], marker="o", label="observed LLNM rate")
            ax.plot(labels, [b["mean_probability"] for b in bins], marker="s", label="mean predicted probability")
            ax.set(ylim=(0, 1), ylabel="rate", title=f"LLNM by {title}")
            if key == "capsule":
                ax.axhline(0.72, color="grey", linestyle=":", label="paper: > 72% within 2.5 mm")
            ax.legend(fontsize=7)
        out.append(("Observed and predicted LLNM rate by location, summed over sites", _png(fig)))
    return out


def figures(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, data URI) of every figure of the report, in page order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return _training(report, plt) + _site_curves(report, plt) + _explanations(report, plt)
