"""`llnm-site evaluate --model CHECKPOINT --data SITE_DIR`: a global model on this site's own patients.

Runs entirely inside the hospital: reads the site folder (through the preprocessing cache), scores the
chosen split with the checkpoint, and writes the full metrics (AUC with bootstrap CI, threshold metrics,
calibration, decision curve, and risk-stage metrics when the model has that head) as JSON. Nothing is sent
anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint (.safetensors with its .json) or a run directory")
    p.add_argument("--data", required=True, help="this site's folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--out", help="write the metrics JSON here (default: print it)")
    p.add_argument("--predictions", help="also write per-patient scores (CSV) here, for the site's own use")
    p.add_argument("--cache-dir")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def evaluate_site(model_path: str, site_dir: str, *, split: str = "test", threshold: float = 0.5,
                  n_bootstrap: int = 1000, cache_dir: str | None = None, device: str = "auto"
                  ) -> tuple[dict[str, Any], Any, Any]:
    import numpy as np
    from sklearn.metrics import confusion_matrix

    from shared_model.evaluation.metrics import binary_metrics, calibration_curve_data, decision_curve
    from shared_model.model.checkpoint import model_from_checkpoint
    from shared_model.model.modeling import ModelConfig
    from shared_model.model.training import predict
    from shared_model.sitedata.model_inputs import load_site_inputs, make_dataset
    from shared_model.sitedata.preprocessing import PreprocessConfig

    model, meta = model_from_checkpoint(model_path)
    model_cfg = ModelConfig.from_dict(meta["model_config"])
    pre = PreprocessConfig.from_dict(meta["preprocess_config"])
    tensors = load_site_inputs(Path(site_dir), pre, model_cfg, cache_dir=Path(cache_dir) if cache_dir else None,
                               progress=True)
    subset = tensors if split == "all" else tensors.subset(split)
    preds = predict(model, make_dataset(subset), device=device)
    labelled = preds["llnm"] >= 0
    y = preds["llnm"][labelled].astype(int)
    s = preds["score"][labelled]
    result: dict[str, Any] = {
        "site": tensors.site,
        "split": split,
        "checkpoint": str(model_path),
        "round": meta.get("round"),
        "n_scored": len(preds["score"]),
        "n_labelled": int(labelled.sum()),
        # Rows of patients.csv left out (bad record, unreadable file): never silently.
        "skipped": list(getattr(tensors, "meta", {}).get("skipped", [])),
        "metrics": binary_metrics(y, s, threshold=threshold, n_bootstrap=n_bootstrap),
    }
    if len(y) and len(np.unique(y)) == 2:
        result["calibration"] = calibration_curve_data(y, s)
        result["decision_curve"] = decision_curve(y, s)
    if "stage_prob" in preds:
        st = preds["stage"]
        known = st >= 0
        if known.any():
            pred_stage = preds["stage_prob"][known].argmax(axis=1)
            result["risk_stage"] = {
                "n": int(known.sum()),
                "accuracy": float((pred_stage == st[known]).mean()),
                "confusion": confusion_matrix(st[known], pred_stage, labels=[0, 1, 2]).tolist(),
            }
    return result, subset, preds


def summary_line(result: dict) -> str:
    """The headline of an evaluation, for the person who ran it (the JSON holds the rest)."""
    from shared_model.numbers import finite_or_none

    m = result["metrics"]

    def num(key: str) -> str:
        v = finite_or_none(m.get(key))
        return "-" if v is None else f"{v:.3f}"

    ci = f" [{num('auc_ci_low')}, {num('auc_ci_high')}]" if finite_or_none(m.get("auc_ci_low")) is not None else ""
    model = f"the round-{result['round']} model" if result.get("round") is not None else "the model"
    return (f"{result['site']}, {result['split']} split, {model}: {m.get('n', 0)} "
            f"patient(s), {m.get('n_pos', 0)} with LLNM; AUC {num('auc')}{ci}, sensitivity {num('sensitivity')}, "
            f"specificity {num('specificity')} at threshold {m.get('threshold')}")


def run(args: argparse.Namespace) -> int:
    try:
        result, subset, preds = evaluate_site(args.model, args.data, split=args.split, threshold=args.threshold,
                                              n_bootstrap=args.bootstrap, cache_dir=args.cache_dir,
                                              device=args.device)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for skip in result["skipped"]:
        where = f"row {skip['row']} ({skip['patient_id']}) left out: " if skip.get("row") is not None else ""
        print(f"warning: {args.data}: {where}{'; '.join(skip['reasons'])}", file=sys.stderr)
    if result["skipped"]:
        print(f"warning: {len(result['skipped'])} patient row(s) left out; `llnm-site check {args.data}` says why",
              file=sys.stderr)
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(summary_line(result))
        print(f"wrote {args.out}")
    else:
        print(text)
    if args.predictions:
        import csv

        with open(args.predictions, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "llnm", "score"])
            for pid, y, s in zip(subset.patient_ids, preds["llnm"], preds["score"], strict=True):
                w.writerow([pid, "" if y < 0 else int(y), f"{s:.6f}"])
    return 0
