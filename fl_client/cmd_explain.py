"""`llnm-site explain --model RUN_DIR_OR_CHECKPOINT --data SITE_DIR --out DIR`: the global model explained on
this site's own patients, for its own clinicians. Nothing is sent anywhere.

Writes into DIR (never into the site's folder):

* ``explanations.json``: per explained patient the score and label, the integrated-gradients feature-group
  shares, the capsule distance and lobe third, the report segments (or word pieces) and scalar tokens ranked by
  attention rollout; and the site's aggregates, exactly what a federation with ``evaluation.explain: true``
  would receive from this site (`fl_client.explain.site_explanation`);
* ``figures/<patient>.png``: per view, the texture channel with its Grad-CAM++ map (torchcam) and the location
  channel with the attention-rollout map of the image patches;
* ``index.html``: one page with every patient's figure and top report segments (it opens offline).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint (.safetensors with its .json) or a run directory")
    p.add_argument("--data", required=True, help="this site's folder (only read)")
    p.add_argument("--out", required=True, help="folder to write the explanations into (outside the site folder)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--patients", type=int, default=20,
                   help="explain this many patients, highest predicted risk first (default 20; 0 = all)")
    p.add_argument("--patient", action="append", default=[], metavar="ID",
                   help="explain this patient (repeatable; overrides --patients)")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (default 32)")
    p.add_argument("--top", type=int, default=3, help="report segments listed per patient (default 3)")
    p.add_argument("--cache-dir")


def _report_units(site_dir: Path, pre: Any, ids: list[str]) -> dict[str, list[str]]:
    """What each report token of the model stands for: the report's segments, or its word pieces."""
    from shared_model.model.text_encoder import split_report, verify_encoder_files
    from shared_model.sitedata.contract import load_site

    site = load_site(site_dir, inputs=pre.inputs)
    texts = {}
    for record in site.patients:
        if record.patient_id in ids and record.report is not None:
            texts[record.patient_id] = Path(record.report).read_text(encoding="utf-8")
    if pre.text.unit == "segment":
        return {pid: split_report(t)[: pre.text.max_segments] for pid, t in texts.items()}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(verify_encoder_files(pre.text)), local_files_only=True)
    return {pid: tokenizer.convert_ids_to_tokens(tokenizer(t.strip(), truncation=True,
                                                           max_length=pre.text.num_positions)["input_ids"])
            for pid, t in texts.items()}


def _figure(path: Path, pid: str, image: Any, view_mask: Any, cams: list[np.ndarray],
            rollout: list[np.ndarray | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = image.shape[0]
    fig, axes = plt.subplots(views, 2, figsize=(6.0, 3.0 * views), squeeze=False)
    size = image.shape[-1]
    for v in range(views):
        name = ("transverse", "longitudinal")[v] if views == 2 else f"view {v}"
        left, right = axes[v]
        left.imshow(image[v, 0], cmap="gray", vmin=0, vmax=1)
        right.imshow(image[v, 2], cmap="gray", vmin=0, vmax=1)
        if view_mask[v] > 0.5:
            extent = (-0.5, size - 0.5, size - 0.5, -0.5)  # the patch grid stretched over the view
            left.imshow(cams[v], cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=extent, interpolation="bilinear")
            if rollout[v] is not None:
                r = rollout[v] / max(float(rollout[v].max()), 1e-12)
                right.imshow(r, cmap="magma", alpha=0.45, vmin=0, vmax=1, extent=extent, interpolation="bilinear")
            left.set_title(f"{name}: texture + Grad-CAM++", fontsize=8)
            right.set_title(f"{name}: location + attention rollout", fontsize=8)
        else:
            left.set_title(f"{name}: missing", fontsize=8)
        for ax in (left, right):
            ax.axis("off")
    fig.suptitle(pid, fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def explain_site(model_path: str, site_dir: str, out_dir: str, *, split: str = "test", patients: int = 20,
                 patient_ids: list[str] | None = None, steps: int = 32, top: int = 3,
                 cache_dir: str | None = None) -> dict[str, Any]:
    """Compute and write the explanations; returns the content of explanations.json."""
    from fl_client.explain import site_explanation
    from fl_client.explain.attribution import group_totals, shares
    from fl_client.explain.gradcam import gradcam_pp
    from fl_client.explain.location import capsule_bin, patient_locations
    from fl_client.explain.rollout import attention_rollout
    from shared_model.config import PreprocessConfig
    from shared_model.evaluation.explanation import CAPSULE_BIN_LABELS, LOBE_THIRDS, feature_groups
    from shared_model.model.checkpoint import model_from_checkpoint
    from shared_model.model.configuration import ModelConfig
    from shared_model.model.training import predict
    from shared_model.naming import safe_filename
    from shared_model.sitedata.model_inputs import load_site_inputs, make_dataset

    site, out = Path(site_dir).resolve(), Path(out_dir).resolve()
    if out == site or out.is_relative_to(site):
        raise ValueError(f"--out {out_dir} is inside the site folder {site_dir}: explanations are never written "
                         "into a hospital's data folder; choose another folder")
    model, meta = model_from_checkpoint(model_path)
    model_cfg = ModelConfig.from_dict(meta["model_config"])
    pre = PreprocessConfig.from_dict(meta["preprocess_config"])
    if model_cfg.architecture != "llnm-net":
        raise ValueError(f"checkpoint {model_path}: explanations need the LLNM-Net transformer; this model is "
                         f"the {model_cfg.architecture!r} architecture")
    tensors = load_site_inputs(site, pre, model_cfg, cache_dir=Path(cache_dir) if cache_dir else None,
                               progress=True)
    subset = tensors if split == "all" else tensors.subset(split)
    preds = predict(model, make_dataset(subset), device="cpu")
    y, score = preds["llnm"].astype(int), preds["score"]
    totals = group_totals(model, subset, steps=steps)  # once: the aggregates and each patient's shares
    aggregates = site_explanation(model, subset, pre.inputs, y, score, totals=totals)

    if patient_ids:
        unknown = sorted(set(patient_ids) - set(subset.patient_ids))
        if unknown:
            raise ValueError(f"patient(s) {', '.join(unknown)} not in the {split} split of {site_dir}")
        chosen = [subset.patient_ids.index(p) for p in patient_ids]
    else:
        order = np.argsort(-score, kind="stable")
        chosen = order.tolist() if patients <= 0 else order[:patients].tolist()
    picked = subset.select(chosen)
    groups = feature_groups(pre.inputs)
    per_patient, _ = shares(totals[chosen])
    rollout = attention_rollout(model, picked)
    views = picked.image.shape[1] if model_cfg.images else 0
    cams = [gradcam_pp(model, picked, v) for v in range(views)]
    capsule, third = patient_locations(picked, pre.inputs)
    bins = capsule_bin(capsule)
    units = _report_units(site, pre, list(picked.patient_ids)) if model_cfg.reports else {}
    scalars = list(pre.inputs.feature_names)

    (out / "figures").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, pid in enumerate(picked.patient_ids):
        j = chosen[i]
        per_view = rollout[i]["views"]
        entry: dict[str, Any] = {
            "patient_id": pid, "score": float(score[j]), "llnm": None if y[j] < 0 else int(y[j]),
            "capsule_distance_mm": None if np.isnan(capsule[i]) else float(capsule[i]),
            "capsule_bin": None if bins[i] < 0 else CAPSULE_BIN_LABELS[bins[i]],
            "lobe_third": None if third[i] < 0 else LOBE_THIRDS[third[i]],
            "group_shares": dict(zip(groups, per_patient[i].round(4).tolist(), strict=True)),
            "scalar_attention": dict(zip(scalars, np.mean([v["scalars"] for v in per_view], axis=0).round(4).tolist(),
                                         strict=True)),
        }
        if model_cfg.reports:
            rel = np.mean([v["report"] for v in per_view], axis=0)
            text_units = units.get(pid, [])
            ranked = sorted(range(min(len(text_units), len(rel))), key=lambda k: -rel[k])[:top]
            entry["report_top"] = [{"text": text_units[k], "attention": round(float(rel[k]), 4)} for k in ranked]
        if views:
            name = safe_filename(pid) + ".png"
            _figure(out / "figures" / name, pid, picked.image[i].numpy(), picked.view_mask[i].numpy(),
                    [c[i] for c in cams], [rollout[i]["views"][v]["image"] for v in range(views)])
            entry["figure"] = f"figures/{name}"
        rows.append(entry)

    result = {
        "site": subset.site, "split": split, "checkpoint": str(model_path), "round": meta.get("round"),
        "methods": {
            "group_shares": "integrated gradients (captum), zero baseline, on the patient's LLNM probability; "
                            "a group's share of the patient's total |attribution|",
            "gradcam": "Grad-CAM++ (torchcam) on the image tokens after the last bidirectional block, per view",
            "attention": "attention rollout over every block (heads averaged, 0.5 A + 0.5 I), mean over the "
                         "pooled tokens",
        },
        "aggregates": {"groups": groups, **aggregates},
        "patients": rows,
    }
    multi = [v.name for v in pre.inputs.clinical if v.token_levels > 2]
    if multi:
        result["notes"] = [f"{', '.join(multi)}: categorical with more than two levels; integrated gradients "
                           "cannot attribute a one-hot code (share 0)"]
    (out / "explanations.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "index.html").write_text(_page(result), encoding="utf-8")
    return result


def _page(result: dict[str, Any]) -> str:
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>Explanations: {esc(str(result['site']))}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}td,th{border:1px solid #bbb;"
             "padding:3px 6px;vertical-align:top}table{border-collapse:collapse}</style></head><body>",
             f"<h1>Explanations of the global model at {esc(str(result['site']))} ({esc(result['split'])})</h1>",
             "<p>For this site's clinicians only: this page names patients and quotes their reports.</p>",
             "<h2>Feature-group shares (mean over the explained split)</h2><table><tr>"]
    agg = result["aggregates"]
    if agg["shares"]:
        parts.append("".join(f"<th>{esc(g)}</th>" for g in agg["groups"]) + "</tr><tr>"
                     + "".join(f"<td>{v:.1%}</td>" for v in agg["shares"]) + "</tr></table>")
    else:
        parts.append("</tr></table><p>Too few labelled patients for a mean (a federation would not be sent one).</p>")
    for p in result["patients"]:
        parts.append(f"<h3>{esc(p['patient_id'])}: predicted risk {p['score']:.2f}, LLNM {p['llnm']}, "
                     f"capsule {esc(str(p['capsule_bin']))}, {esc(str(p['lobe_third']))} third</h3>")
        if p.get("report_top"):
            parts.append("<ol>" + "".join(f"<li>{esc(t['text'])} <small>({t['attention']:.3f})</small></li>"
                                          for t in p["report_top"]) + "</ol>")
        if p.get("figure"):
            parts.append(f"<img src='{esc(p['figure'])}' alt='Grad-CAM++ and rollout of {esc(p['patient_id'])}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    try:
        result = explain_site(args.model, args.data, args.out, split=args.split, patients=args.patients,
                              patient_ids=args.patient, steps=args.steps, top=args.top, cache_dir=args.cache_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    agg = result["aggregates"]
    print(f"explained {len(result['patients'])} patient(s) of {result['site']} ({result['split']}); "
          f"group shares over {agg['n']} patient(s):")
    if not agg["shares"]:
        print("  (too few labelled patients for a mean: a federation would not be sent one)")
    for g, v in zip(agg["groups"], agg["shares"] or [], strict=False):
        print(f"  {g:<22} {v:6.1%}")
    print(f"wrote {Path(args.out) / 'index.html'} and {Path(args.out) / 'explanations.json'}")
    return 0
