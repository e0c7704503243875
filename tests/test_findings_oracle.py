"""The findings reader of the fidelity benchmark: it sees what the data show; what it misses is estimation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_research.synthetic.generator import draw_patients
from fl_research.synthetic.risk_model import DEFAULT_MODEL, PAPER_CALIBRATED_MODEL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def oracle():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _findings_oracle

        yield _findings_oracle
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_the_draw_is_the_one_llnm_synth_wrote(small_consortium: Path) -> None:
    """draw_patients gives exactly the features, labels, splits and present inputs of the written consortium."""
    from tests.conftest import CONSORTIUM_PATIENTS, CONSORTIUM_SEED, CONSORTIUM_SITES

    profiles, tables = draw_patients(sites=CONSORTIUM_SITES, patients=CONSORTIUM_PATIENTS, seed=CONSORTIUM_SEED,
                                     model=DEFAULT_MODEL, layout="default")
    for profile, drawn in zip(profiles, tables, strict=True):
        written = pd.read_csv(small_consortium / "truth" / f"{profile.name}.csv")
        assert list(written["patient_id"]) == list(drawn["patient_id"])
        for column in ("split", "llnm", "capsule_mm", "third", "margin", "microcalcifications", "age", "sex"):
            assert list(written[column]) == list(drawn[column]), (profile.name, column)
        for column in ("has_report", "has_trans", "has_long"):
            assert list(written[column].astype(bool)) == list(drawn[column]), (profile.name, column)


def test_the_reader_sees_only_what_the_present_inputs_show(oracle) -> None:
    truth = pd.DataFrame({
        "has_trans": [1, 0, 1], "has_long": [1, 1, 0], "has_report": [1, 0, 1],
        "report_reveals": ["node;capsule", "", "third;node"],
        "capsule_mm": [1.0, 2.0, 3.0], "size_mm": [8.0, 9.0, 10.0], "third": ["upper", "middle", "lower"],
        "lobe": ["left", "right", "left"], "margin": ["smooth", "irregular", "smooth"],
        "echogenicity": ["hypoechoic"] * 3, "composition": ["solid"] * 3, "microcalcifications": [1, 0, 1],
        "taller_than_wide": [0, 1, 0], "node_finding": [1, 1, 0], "age": [40, 50, 60], "sex": ["F", "M", "F"],
        "site": ["site-a", "site-b", "site-a"]})
    image, _ = oracle.design(truth, "image")
    # The longitudinal view shows the third; patient 2 has none, patient 1 has it.
    assert image["third?"].tolist() == [0.0, 0.0, 1.0]
    # Only the transverse view shows the capsule distance; no image shows the node finding, age or sex.
    assert image["capsule?"].tolist() == [0.0, 1.0, 0.0] and image["capsule"].tolist() == [1.0, 0.0, 3.0]
    assert not any(c.startswith(("node", "age", "sex", "site")) for c in image.columns)
    every, numeric = oracle.design(truth, "all")
    assert "third?" not in every.columns  # patient 2's report states the third
    assert every["node?"].tolist() == [0.0, 1.0, 0.0] and every["node=1"].tolist() == [1.0, 0.0, 0.0]
    assert numeric == ["capsule", "size", "age"]
    with_site, _ = oracle.design(truth, "all+site")
    assert with_site["site=site-b"].tolist() == [0.0, 1.0, 0.0]


def test_with_every_finding_and_enough_patients_the_reader_reaches_bayes(oracle) -> None:
    """A well-specified reader: site-aware it comes within 1% of the Bayes AUC on 20,000 drawn patients; without the
    site it cannot use the hospitals' own intercepts, which the Bayes AUC does."""
    from sklearn.metrics import roc_auc_score

    profiles, tables = draw_patients(sites=7, patients=20_000, seed=5, model=PAPER_CALIBRATED_MODEL,
                                     layout="paper-calibrated")
    truth = pd.concat([t.assign(site=p.name) for p, t in zip(profiles, tables, strict=True)], ignore_index=True)
    truth["report_reveals"] = np.where(truth["has_report"], "node", "")
    test = (truth["split"] == "test").to_numpy()
    y = truth["llnm"].to_numpy(int)[test]
    bayes = roc_auc_score(y, truth["risk"].to_numpy(float)[test])
    site_aware = roc_auc_score(y, oracle.fit_and_score(truth, "all+site")) / bayes
    agnostic = roc_auc_score(y, oracle.fit_and_score(truth, "all")) / bayes
    image = roc_auc_score(y, oracle.fit_and_score(truth, "image")) / bayes
    assert site_aware > 0.99
    assert agnostic < site_aware
    assert image < agnostic  # no report: the lymph-node finding is unknown


def test_the_learning_curve_reports_both_readers_per_size(oracle) -> None:
    curve = oracle.learning_curve([700], [3], "paper-calibrated")
    row = curve["700"]
    assert set(row) == {"all", "all+site", "seeds"}
    assert 0.5 < row["all"]["fraction_of_bayes"] <= 1.01
    assert row["seeds"]["3"]["n_train"] > 400
