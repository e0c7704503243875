"""The report and model card of a segmentation run (`task: segment`): what `llnm-server report` writes for it.

From the run directory alone, like `fl_server.report`: per site and pooled, the views scored, each structure's mean
Dice, IoU and 95th-percentile Hausdorff distance, and the error of the capsule distance measured on predicted masks
against the one on drawn masks (the distance of the paper's 2.5 mm finding); the pooled Dice per round; the sites
that had nothing to train on; the privacy of the replies; the checkpoint's hash.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from fl_server.config import ExperimentConfig
from fl_server.run_dir import RunDirectory

__all__ = ["build_segmentation_report", "render_segmentation_card", "render_segmentation_html"]

INTENDED_USE = (
    "Research: segmenting the thyroid lobe and the nodule in a grey ultrasound frame, the first stage of LLNM-Net "
    "(Shen et al., Nature Communications 2025), so that a site can build the location map and the capsule distance "
    "for patients whose masks were never drawn. It is not a medical device; predicted masks must be checked before a "
    "clinical use."
)
STRUCTURES = ("thyroid", "nodule")


def _compare(path: Path) -> dict[str, Any]:
    import json

    data = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    data = data.get("final") or data
    return {"run": path.name, "mode": data.get("mode", "federated"),
            "pooled": {s: ((data.get("pooled") or {}).get(s) or {}).get("dice") for s in STRUCTURES},
            "sites": {site: {s: (m.get(s) or {}).get("dice") for s in STRUCTURES}
                      for site, m in (data.get("sites") or {}).items()}}


def build_segmentation_report(rd: RunDirectory, cfg: ExperimentConfig, metrics: dict[str, Any],
                              compare: list[str | Path] | None = None) -> dict[str, Any]:
    """The report's numbers (report.json) with its model card under ``model_card``."""
    from fl_server.model_card import _sha256
    from fl_server.participation import participation
    from shared_model.model.modeling import count_parameters
    from shared_model.model.segmenter import build_segmenter

    rounds = metrics.get("rounds", [])
    final = metrics.get("final") or {}
    sites = sorted({s for r in rounds for s in r.get("sites", {})} | set(final.get("sites", {})))
    report: dict[str, Any] = {
        "task": "segment",
        "run": cfg.name,
        "run_dir": str(rd.path),
        "strategy": cfg.federation.strategy,
        "rounds_planned": cfg.federation.rounds,
        "best_round": metrics.get("best_round"),
        "best_round_rule": metrics.get("best_round_rule"),
        "sites": sites,
        "training_curves": [{"round": r["round"], "split": r.get("split"),
                             "pooled": {s: ((r.get("pooled") or {}).get(s) or {}).get("dice") for s in STRUCTURES},
                             "idle": r.get("idle", [])} for r in rounds],
        "events": [{"round": r["round"], **f} for r in rounds for f in r.get("failures", [])]
        + [{"round": "final", **f} for f in final.get("failures", [])],
        "final": {k: final.get(k) for k in ("round", "model", "split", "sites", "pooled")} if final else None,
        "compare": [_compare(Path(p)) for p in compare or []],
        "participation": {s: rec.to_dict() for s, rec in participation(metrics, rd.run_info()).items()},
    }
    privacy: list[str] = []
    if rd.privacy_path.is_file():
        from fl_server.privacy import PrivacyLedger

        privacy = PrivacyLedger.load(rd).guarantee_sentences()
    report["privacy"] = privacy
    checkpoint = rd.checkpoint_file(int(final["round"])) if final.get("round") else None
    arch = cfg.segmenter_architecture()
    idle = sorted({s for r in rounds for s in r.get("idle", [])})
    final_sites = final.get("sites") or {}
    noisy = sorted(s for s, m in final_sites.items() if m.get("dp"))
    limitations = [
        "Scored only on views whose masks the site drew; a site without drawn masks in the evaluated split has no "
        "score.",
        f"HD95 counts at most {_cap('HD95_CAP_MM')} mm per view and the capsule-distance error at most "
        f"{_cap('CAPSULE_CAP_MM')} mm, so that one failed mask cannot decide a mean (and a DP reply is bounded).",
    ]
    if idle:
        limitations.append(f"{', '.join(idle)} had no drawn mask in their training split: they trained nothing.")
    if noisy:
        limitations.append(f"Differentially private evaluation at {', '.join(noisy)}: their sums are noisy and they "
                           "send no median.")
    if not (cfg.privacy.patient.enabled or cfg.privacy.site.enabled):
        limitations.append("Trained without differential privacy: the weights the sites sent carry no formal "
                           "guarantee about single patients' images and masks.")
    report["model_card"] = {
        "intended_use": INTENDED_USE,
        "training": {"strategy": cfg.federation.strategy, "rounds": cfg.federation.rounds,
                     "final_round": final.get("round"), "final_model": final.get("model"),
                     "preset": cfg.segmenter.preset, "image_size": arch.image_size,
                     "trainable_parameters": count_parameters(build_segmenter(arch)),
                     "lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "idle_sites": idle},
        "performance": {"split": final.get("split"), "sites": final_sites, "pooled": final.get("pooled")},
        "privacy": privacy or ["No differential privacy in this run."],
        "limitations": limitations,
        "hashes": {"checkpoint": checkpoint.name if checkpoint else None,
                   "checkpoint_sha256": _sha256(checkpoint) if checkpoint else None},
    }
    return report


def _cap(name: str) -> str:
    from shared_model.protocol import segmentation_metrics

    return f"{getattr(segmentation_metrics, name):g}"


def _f(value: Any) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else html.escape(str(value)))


def _rows(perf: dict[str, Any]) -> list[tuple[str, list[str]]]:
    out = []
    for site, m in [*sorted((perf.get("sites") or {}).items()), ("pooled", perf.get("pooled") or {})]:
        cells = [_f(m.get("n") if site != "pooled" else (m.get("thyroid") or {}).get("n"))]
        for s in STRUCTURES:
            part = m.get(s) or {}
            cells += [_f(part.get("dice")), _f(part.get("dice_median")), _f(part.get("iou")), _f(part.get("hd95_mm"))]
        capsule = m.get("capsule_error_mm") or {}
        cells += [_f(capsule.get("mean")), _f(capsule.get("mean_abs")), _f(capsule.get("within_1mm"))]
        out.append((site, cells))
    return out


HEADER = ["views", "thyroid Dice", "median", "IoU", "HD95 mm", "nodule Dice", "median", "IoU", "HD95 mm",
          "capsule error mm (mean)", "mean absolute", "within 1 mm"]


def _figure(report: dict[str, Any]) -> str | None:
    curves = [c for c in report["training_curves"] if any(v is not None for v in c["pooled"].values())]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fl_server.report_figures import _png

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for s in STRUCTURES:
        ax.plot([c["round"] for c in curves], [c["pooled"][s] for c in curves], marker=".", label=s)
    ax.set(xlabel="round", ylabel=f"pooled Dice ({curves[0]['split']})", ylim=(0, 1), title="Training curve")
    ax.legend()
    return _png(fig)


def render_segmentation_html(report: dict[str, Any]) -> str:
    """The self-contained page (no script, no external resource)."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>llnm-fl report: {esc(report['run'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}img{max-width:100%}"
             "</style></head><body>", f"<h1>Run {esc(report['run'])}: nodule and thyroid segmentation</h1>",
             f"<p>Strategy {esc(report['strategy'])}, {report['rounds_planned']} rounds planned, best round "
             f"{_f(report['best_round'])}" + (f" ({esc(report['best_round_rule']['criterion'])})"
                                               if report.get("best_round_rule") else "") + ".</p>"]
    final = report.get("final")
    if final:
        parts.append(f"<h2>Final evaluation ({esc(str(final['split']))}, round-{final['round']} model)</h2>"
                     "<table id='per-site'><tr><th>site</th>" + "".join(f"<th>{esc(h)}</th>" for h in HEADER)
                     + "</tr>")
        parts += [f"<tr><th>{esc(site)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                  for site, cells in _rows(final)]
        parts.append("</table><p>Means over each site's scored views (views with the structure drawn); the pooled "
                     "row adds the sites' sums. The capsule-distance error is the distance from predicted masks "
                     "minus the one from drawn masks, on views with both structures drawn and found.</p>")
    figure = _figure(report)
    if figure:
        parts.append(f"<figure><img src='{figure}' alt='pooled Dice per round'><figcaption>Pooled Dice per round"
                     "</figcaption></figure>")
    if report["compare"]:
        parts.append("<h2>Compared runs</h2><table id='compare'><tr><th>run</th><th>mode</th><th>pooled thyroid "
                     "Dice</th><th>pooled nodule Dice</th></tr>")
        parts += [f"<tr><th>{esc(o['run'])}</th><td>{_f(o['mode'])}</td><td>{_f(o['pooled']['thyroid'])}</td>"
                  f"<td>{_f(o['pooled']['nodule'])}</td></tr>" for o in report["compare"]]
        parts.append("</table>")
    parts.append("<h2>Privacy</h2>")
    parts += [f"<p>{esc(line)}</p>" for line in report["privacy"]] or ["<p>No differential privacy in this run.</p>"]
    parts.append("<h2>Sites that failed, dropped or refused</h2>")
    if report["events"]:
        parts.append("<table id='events'><tr><th>round</th><th>site</th><th>phase</th><th>reason</th></tr>")
        parts += [f"<tr><td>{esc(str(e['round']))}</td><td>{esc(str(e.get('site')))}</td><td>"
                  f"{esc(str(e.get('phase')))}</td><td style='text-align:left'>{esc(str(e.get('reason')))}</td></tr>"
                  for e in report["events"]]
        parts.append("</table>")
    else:
        parts.append("<p>None: every site answered every round.</p>")
    card = report["model_card"]
    parts.append("<h2 id='model-card'>Model card</h2>" + f"<p>{esc(card['intended_use'])}</p><h3>Known limitations"
                 "</h3><ul>" + "".join(f"<li>{esc(s)}</li>" for s in card["limitations"]) + "</ul>"
                 f"<p>Checkpoint {esc(str(card['hashes']['checkpoint']))}: SHA-256 <code>"
                 f"{esc(str(card['hashes']['checkpoint_sha256']))}</code>. The full card is model_card.md.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_segmentation_card(run: str, card: dict[str, Any]) -> str:
    """The card as Markdown."""
    t = card["training"]
    lines = [f"# Model card: {run}", "", "## Intended use", "", card["intended_use"], "", "## Training", "",
             f"- {t['strategy']} for {t['rounds']} rounds; the final model is round {t['final_round']} "
             f"({t['final_model']}).",
             f"- Segmenter preset `{t['preset']}` (MONAI BasicUNet, InstanceNorm), {t['image_size']} x "
             f"{t['image_size']} canvases, {t['trainable_parameters']:,} trainable parameters; batch "
             f"{t['batch_size']}, learning rate {t['lr']}.",
             f"- Sites with nothing to train on: {', '.join(t['idle_sites']) or 'none'}.", "",
             f"## Performance ({card['performance']['split']} split)", "",
             "| site | " + " | ".join(HEADER) + " |", "|---" * (len(HEADER) + 1) + "|"]
    lines += [f"| {site} | " + " | ".join(cells) + " |" for site, cells in _rows(card["performance"])]
    lines += ["", "## Privacy", ""] + [f"- {s}" for s in card["privacy"]]
    lines += ["", "## Known limitations", ""] + [f"- {s}" for s in card["limitations"]]
    h = card["hashes"]
    lines += ["", "## Hashes (SHA-256)", "", f"- checkpoint `{h['checkpoint']}`: `{h['checkpoint_sha256']}`"]
    return "\n".join(lines) + "\n"
