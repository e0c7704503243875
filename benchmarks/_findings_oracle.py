"""What a consortium's training split can teach at all: a reader of every finding, fitted on the same patients.

LLNM-Net must learn two things from a synthetic consortium: to *read* the findings (capsule distance, margin,
microcalcifications, ...) from images and text, and to *weigh* them into a risk from a finite training split. The
Bayes AUC assumes both are perfect. This reference removes the first problem and keeps the second: it hands a
flexible additive model the generator's own findings (`truth/*.csv`, which no site or server reads), masked the way
the data masks them, and fits it on the pooled training split:

* ``image``: what the present views show (`risk_model.TRANS_VIEW_FEATURES`, `LONG_VIEW_FEATURES`), a finding of a
  missing view unknown;
* ``all``: that, plus what the report states (`report_reveals`; the lymph-node finding only a report carries),
  age and sex;
* ``image+site`` and ``all+site``: the same, plus which hospital the patient is from. The generator's risk has a
  per-site intercept (each hospital's own prevalence), and both the Bayes AUC and the image bound use it; a global
  model knows the site only as far as it can tell it from a report's dialect or a scanner's look, so the
  site-agnostic ceiling is the reader without ``+site``.

Numbers enter through cubic splines (capsule distance, log size, age), categories one-hot, each with an "unknown"
indicator; a logistic regression (L2, C = 1) weighs them. The generator's risk is additive in these findings on the
logit scale, so this model is well specified: what it leaves to the Bayes AUC on the test split is the price of
estimating the weights from this many patients. A learned model that falls short of the Bayes AUC by about as much
is data-limited, not reading-limited. The settings were chosen once, before looking at any result, and are not tuned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fl_research.synthetic.risk_model import (
    COMPOSITIONS,
    ECHOGENICITIES,
    LONG_VIEW_FEATURES,
    MARGINS,
    THIRDS,
    TRANS_VIEW_FEATURES,
)

#: Truth column and kind of every finding the readers may see (numbers go through splines).
_FINDINGS: dict[str, tuple[str, str | tuple[str, ...]]] = {
    "capsule": ("capsule_mm", "number"),
    "size": ("size_mm", "log-number"),
    "third": ("third", THIRDS),
    "lobe": ("lobe", ("right", "left")),
    "margin": ("margin", MARGINS),
    "echogenicity": ("echogenicity", ECHOGENICITIES),
    "composition": ("composition", COMPOSITIONS),
    "microcalc": ("microcalcifications", (0, 1)),
    "shape": ("taller_than_wide", (0, 1)),
    "node": ("node_finding", (0, 1)),
    "age": ("age", "number"),
    "sex": ("sex", ("F", "M")),
}
SPLINE_KNOTS = 8
C = 1.0


def read_truth(data: Path) -> pd.DataFrame:
    """Every site's truth table, with a ``site`` column."""
    frames = [pd.read_csv(path).assign(site=path.stem) for path in sorted((data / "truth").glob("*.csv"))]
    if not frames:
        raise FileNotFoundError(f"{data / 'truth'}: no truth tables (is {data} an llnm-synth consortium?)")
    return pd.concat(frames, ignore_index=True)


def _shown(truth: pd.DataFrame, reader: str) -> dict[str, np.ndarray]:
    """Per finding, which patients' data show it to `reader` (``image`` or ``all``, without ``+site``)."""
    trans, long = truth["has_trans"].to_numpy(bool), truth["has_long"].to_numpy(bool)
    reveals = [set(str(r).split(";")) if isinstance(r, str) and r else set() for r in truth["report_reveals"]]
    has_report = truth["has_report"].to_numpy(bool)
    shown = {}
    for name in _FINDINGS:
        seen = (trans & (name in TRANS_VIEW_FEATURES)) | (long & (name in LONG_VIEW_FEATURES))
        if reader == "all":
            seen = seen | (has_report & np.array([name in r for r in reveals], dtype=bool))
            if name in ("age", "sex"):
                seen = np.ones(len(truth), dtype=bool)
        shown[name] = seen
    return shown


def design(truth: pd.DataFrame, reader: str) -> tuple[pd.DataFrame, list[str]]:
    """The reader's inputs (unknown findings as 0 with an indicator) and the names of its numeric columns."""
    site_aware = reader.endswith("+site")
    shown = _shown(truth, reader.removesuffix("+site"))
    cols: dict[str, np.ndarray] = {}
    numeric = []
    for name, (column, kind) in _FINDINGS.items():
        seen = shown[name]
        if not seen.any():
            continue
        if kind in ("number", "log-number"):
            values = truth[column].to_numpy(float)
            values = np.log2(np.maximum(values, 0.1)) if kind == "log-number" else values
            cols[name] = np.where(seen, values, 0.0)
            numeric.append(name)
        else:
            for level in kind[1:]:  # the first level is the reference
                cols[f"{name}={level}"] = np.where(seen, (truth[column] == level).to_numpy(float), 0.0)
        if not seen.all():
            cols[f"{name}?"] = (~seen).astype(float)
    if site_aware:
        for site in sorted(truth["site"].unique())[1:]:
            cols[f"site={site}"] = (truth["site"] == site).to_numpy(float)
    return pd.DataFrame(cols), numeric


def fit_and_score(truth: pd.DataFrame, reader: str) -> np.ndarray:
    """Test-split risk scores of the reader fitted on the training split (test rows in truth order)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import SplineTransformer

    x, numeric = design(truth, reader)
    split = truth["split"].to_numpy()
    train, test = split == "train", split == "test"
    splines = ColumnTransformer([("splines", SplineTransformer(n_knots=SPLINE_KNOTS, degree=3), numeric)],
                                remainder="passthrough")
    model = make_pipeline(splines, LogisticRegression(C=C, max_iter=5000))
    model.fit(x[train], truth["llnm"].to_numpy(int)[train])
    return model.predict_proba(x[test])[:, 1]


def findings_oracle(data: Path) -> dict[str, Any]:
    """Test AUC of both readers, beside the Bayes AUC and the image bound of the same test patients."""
    from sklearn.metrics import roc_auc_score

    truth = read_truth(data)
    test = truth[truth["split"] == "test"]
    y = test["llnm"].to_numpy(int)
    bayes = float(roc_auc_score(y, test["risk"]))
    image_bound = float(roc_auc_score(y, test["best_image"]))
    all_auc = float(roc_auc_score(y, fit_and_score(truth, "all")))
    site_auc = float(roc_auc_score(y, fit_and_score(truth, "all+site")))
    image_auc = float(roc_auc_score(y, fit_and_score(truth, "image")))
    image_site_auc = float(roc_auc_score(y, fit_and_score(truth, "image+site")))
    return {"n_train": int((truth["split"] == "train").sum()), "n_test": len(test),
            "all": {"test_auc": round(all_auc, 4), "bayes_test_auc": round(bayes, 4),
                    "fraction_of_bayes": round(all_auc / bayes, 4)},
            "all+site": {"test_auc": round(site_auc, 4), "fraction_of_bayes": round(site_auc / bayes, 4)},
            "image": {"test_auc": round(image_auc, 4), "image_bound_test_auc": round(image_bound, 4),
                      "gap_to_bound": round(image_bound - image_auc, 4)},
            "image+site": {"test_auc": round(image_site_auc, 4),
                           "gap_to_bound": round(image_bound - image_site_auc, 4)},
            "model": f"logistic regression (C={C}) on cubic splines ({SPLINE_KNOTS} knots) of the numbers and "
                     "one-hot categories, each with an unknown indicator"}


def learning_curve(sizes: list[int], seeds: list[int], profile: str) -> dict[str, Any]:
    """The ``all`` and ``all+site`` readers' fractions of the Bayes AUC against consortium size, on the patients
    `llnm-synth` would draw for each size and seed (`generator.draw_patients`: the same features, labels and
    splits, nothing rendered, so it runs in seconds at the paper's 39,451).

    Without rendering there are no reports, so the reader takes the lymph-node finding from every patient with a
    report, and never a finding of a missing view from the report's text: a little less than `findings_oracle`'s
    reader sees, for the few patients with one view.
    """
    from sklearn.metrics import roc_auc_score

    from fl_research.synthetic.generator import draw_patients
    from fl_research.synthetic.risk_model import RISK_MODELS

    curve: dict[str, Any] = {}
    for size in sizes:
        per_seed = {}
        for seed in seeds:
            profiles, tables = draw_patients(sites=7, patients=size, seed=seed, model=RISK_MODELS[profile],
                                             layout=profile)
            truth = pd.concat([t.assign(site=p.name) for p, t in zip(profiles, tables, strict=True)],
                              ignore_index=True)
            truth["report_reveals"] = np.where(truth["has_report"], "node", "")
            test = (truth["split"] == "test").to_numpy()
            y = truth["llnm"].to_numpy(int)[test]
            bayes = float(roc_auc_score(y, truth["risk"].to_numpy(float)[test]))
            row: dict[str, Any] = {"n_train": int((truth["split"] == "train").sum()), "bayes_test_auc": round(bayes, 4)}
            for reader in ("all", "all+site"):
                row[reader] = round(float(roc_auc_score(y, fit_and_score(truth, reader))) / bayes, 4)
            per_seed[str(seed)] = row
        curve[str(size)] = {
            reader: {"fraction_of_bayes": round(float(np.mean([r[reader] for r in per_seed.values()])), 4),
                     "fraction_of_bayes_min": min(r[reader] for r in per_seed.values())}
            for reader in ("all", "all+site")} | {"seeds": per_seed}
    return curve
