"""The run's model card (`RUN_DIR/model_card.md` and its section of the report).

In the spirit of "Model Cards for Model Reporting" (Mitchell et al. 2019): intended use, the population each
site evaluated on, the training set-up, per-site performance with confidence intervals and the worst site,
the privacy guarantee, known limitations, and the SHA-256 of the checkpoint and of every frozen encoder, so
that a reader can check they hold the model the card describes. Built from the run directory alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl_server.config import ExperimentConfig
from fl_server.participation import SiteParticipation, participation_lines
from fl_server.run_dir import RunDirectory

__all__ = ["model_card_data", "render_model_card"]

INTENDED_USE = (
    "Research on predicting lateral lymph node metastasis (LLNM) in papillary thyroid cancer before surgery from "
    "two ultrasound views, the radiology report and clinical variables, following LLNM-Net (Shen et al., Nature "
    "Communications 2025). It is not a medical device: it must not guide the care of a patient without a "
    "prospective validation at the site where it would be used."
)


def _rounds_detail(t: dict) -> str:
    parts = t.get("rounds_per_epoch") or 1
    if parts == 1:
        return f" of {t['local_epochs']} local epoch(s)"
    passes = t.get("data_epochs")
    return (f", each on 1/{parts} of every site's training data ({passes} pass{'es' if passes != 1 else ''} over "
            "the data in all)")


def _sha256(path: Path) -> str | None:
    from shared_model.model.encoder_files import sha256_file

    return sha256_file(path) if path.is_file() else None


def _limitations(cfg: ExperimentConfig, report: dict[str, Any], synthetic: bool) -> list[str]:
    out = []
    if synthetic:
        out.append("The consortium is synthetic (llnm-synth): its patients, images and reports are generated; "
                   "the figures say how the software and the model behave, not how the model would do on patients.")
    small = [s for s, m in (report.get("population") or {}).items() if (m.get("n") or 0) < 50]
    if small:
        out.append(f"Few evaluated patients at {', '.join(sorted(small))} (< 50): their AUCs have wide intervals.")
    if not cfg.preprocess.inputs.images:
        out.append("Trained without images: the paper's image findings (location, margin) are not used.")
    if not cfg.preprocess.inputs.reports:
        out.append("Trained without reports.")
    if not (cfg.privacy.patient.enabled or cfg.privacy.site.enabled):
        out.append("Trained without differential privacy: the model updates the sites sent carry no formal "
                   "guarantee against what they reveal about single patients.")
    final_sites = (report.get("final") or {}).get("sites") or {}
    noisy = {s: m["dp"] for s, m in final_sites.items() if isinstance(m.get("dp"), dict)}
    exact = sorted(set(final_sites) - set(noisy))
    if noisy:
        eps = ", ".join(f"{s} {d['epsilon']:g}" for s, d in sorted(noisy.items()))
        out.append(f"Differentially private evaluation at {', '.join(sorted(noisy))} (epsilon per reply: {eps}): "
                   "their counts, metrics and curves come from noisy score histograms (docs/privacy.md, "
                   "\"Evaluation under the site's control\"); their population counts and risk-stage metrics are "
                   "not sent.")
    if exact:
        out.append(f"Exact evaluation at {', '.join(exact)} (the sites' exact-evaluation): their metrics, score "
                   "histograms, population counts and explanation aggregates carry no differential-privacy "
                   "guarantee for their validation and test patients (docs/privacy.md).")
    out.append("Each site's metrics are on its own held-out split of the same hospitals it trained with; no "
               "external site was held out.")
    return out


def model_card_data(rd: RunDirectory, cfg: ExperimentConfig, report: dict[str, Any]) -> dict[str, Any]:
    """The card's content (also kept in report.json under `model_card`)."""
    from shared_model.model.architectures import build_model
    from shared_model.model.modeling import count_parameters

    final = report.get("final") or {}
    arch = cfg.architecture()
    checkpoint = rd.checkpoint_file(int(final["round"])) if final.get("round") else None
    encoders: dict[str, str | None] = {}
    if cfg.preprocess.inputs.reports:
        text = cfg.preprocess.text
        weights = text.sha256 or _sha256(text.resolved_path() / "model.safetensors")
        encoders["text encoder (model.safetensors)"] = weights
    if arch.architecture == "feature-head" or arch.image_features == "public-tokens":
        from shared_model.model.backbone import BACKBONE_SHA256

        encoders["image backbone (EfficientNet-Lite0)"] = BACKBONE_SHA256
    sites = final.get("sites") or {}
    aucs = {s: m.get("auc") for s, m in sites.items() if m.get("auc") is not None}
    worst = min(aucs, key=lambda s: aucs[s]) if aucs else None
    root = Path(cfg.data.root) if cfg.data.root else None
    synthetic = bool(root and (root / "consortium.json").is_file())
    return {
        "intended_use": INTENDED_USE,
        "population": report.get("population") or {},
        "training": {
            "strategy": cfg.federation.strategy, "rounds": cfg.federation.rounds, "final_model": final.get("model"),
            "final_round": final.get("round"), "local_epochs": cfg.train.local_epochs,
            "rounds_per_epoch": cfg.federation.rounds_per_epoch, "data_epochs": cfg.data_epochs(),
            "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "lr_schedule": cfg.train.lr_schedule,
            "model_preset": cfg.model.preset, "trainable_parameters": count_parameters(build_model(arch)),
            "inputs": {"images": cfg.preprocess.inputs.images, "reports": cfg.preprocess.inputs.reports,
                       "clinical": [v.name for v in cfg.preprocess.inputs.clinical]},
            "risk_stage_head": arch.num_stages > 0,
            "secure_aggregation": cfg.federation.secure_aggregation,
            "sites": report.get("sites"),
            "participation": report.get("participation") or {},
        },
        "performance": {"split": final.get("split"), "sites": sites, "pooled": final.get("pooled"),
                        "worst_site": worst, "worst_auc": aucs.get(worst) if worst else None},
        "privacy": report.get("privacy") or ["No differential privacy in this run."],
        "limitations": _limitations(cfg, report, synthetic),
        "hashes": {"checkpoint": str(checkpoint.name) if checkpoint else None,
                   "checkpoint_sha256": _sha256(checkpoint) if checkpoint else None, "encoders": encoders},
    }


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _inputs_text(inputs: dict[str, Any]) -> str:
    """The model's inputs in words: "two ultrasound views, the report, clinical age, sex"."""
    parts = (["the ultrasound views"] if inputs["images"] else ["no images"]) + \
        (["the report"] if inputs["reports"] else ["no report"])
    clinical = ", ".join(inputs["clinical"])
    return ", ".join(parts) + (f", clinical {clinical}" if clinical else ", no clinical variable")


def _f(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if pct else (f"{value:.3f}" if isinstance(value, float) else str(value))


def render_model_card(run: str, card: dict[str, Any]) -> str:
    """The card as Markdown."""
    t = card["training"]
    parts = {site: SiteParticipation(**rec) for site, rec in t.get("participation", {}).items()}
    trained = [site for site, p in parts.items() if p.trained] if parts else list(t["sites"] or [])
    not_training = participation_lines(parts, only_problems=True)
    lines = [f"# Model card: {run}", "", "## Intended use", "", card["intended_use"], "",
             "## Population (the final evaluation split at each site)", "",
             "| site | patients | LLNM | prevalence | transverse views | longitudinal views | thyroid masks "
             "(trans/long) | calibrated views (trans/long) | reports |",
             "|---|---|---|---|---|---|---|---|---|"]
    for site, p in sorted(card["population"].items()):
        views, masks, cal = p.get("views") or [None, None], p.get("thyroid_masks") or [None, None], \
            p.get("calibrated") or [None, None]
        lines.append(f"| {site} | {_f(p.get('n'))} | {_f(p.get('n_pos'))} | {_f(p.get('prevalence'), True)} | "
                     f"{_f(views[0])} | {_f(views[1])} | {_f(masks[0])}/{_f(masks[1])} | {_f(cal[0])}/{_f(cal[1])} "
                     f"| {_f(p.get('reports'))} |")
    lines += ["", "## Training", "",
              f"- {t['strategy']} over {len(trained)} site(s) that trained ({', '.join(trained) or 'none'}), "
              f"{t['rounds']} rounds{_rounds_detail(t)}, batch {t['batch_size']}, learning rate {t['lr']} "
              f"({t['lr_schedule']}); the final model is round {t['final_round']} ({t['final_model']}).",
              *(f"- {line}." for line in not_training),
              f"- Model preset `{t['model_preset']}`, {t['trainable_parameters']:,} trainable parameters; inputs: "
              f"{_inputs_text(t['inputs'])}; risk-stage head: {_yes(t['risk_stage_head'])}.",
              f"- Secure aggregation: {_yes(t['secure_aggregation'])}.", "",
              f"## Performance ({card['performance']['split']} split, threshold 0.5)", "",
              "| site | n | AUC (95% CI) | sensitivity | specificity | Brier |", "|---|---|---|---|---|---|"]
    perf = card["performance"]
    for site, m in [*sorted(perf["sites"].items()), ("pooled", perf["pooled"] or {})]:
        ci = (f" ({_f(m['auc_ci_low'])}-{_f(m['auc_ci_high'])})" if m.get("auc_ci_low") is not None
              and m.get("auc_ci_high") is not None else "")
        lines.append(f"| {site} | {_f(m.get('n'))} | {_f(m.get('auc'))}{ci} | {_f(m.get('sensitivity'))} | "
                     f"{_f(m.get('specificity'))} | {_f(m.get('brier'))} |")
    lines += ["", f"Worst site: {perf['worst_site']} (AUC {_f(perf['worst_auc'])}).", "", "## Privacy", ""]
    lines += [f"- {s}" for s in card["privacy"]]
    lines += ["", "## Known limitations", ""] + [f"- {s}" for s in card["limitations"]]
    h = card["hashes"]
    lines += ["", "## Hashes (SHA-256)", "", f"- checkpoint `{h['checkpoint']}`: `{h['checkpoint_sha256']}`"]
    lines += [f"- {name}: `{value}`" for name, value in h["encoders"].items()]
    return "\n".join(lines) + "\n"
