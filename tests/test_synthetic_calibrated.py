"""`llnm-synth --profile paper-calibrated` and the generator's own feature attribution (truth shares)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_research.synthetic import generate_consortium, sample_patients
from fl_research.synthetic.cli import main as synth_main
from fl_research.synthetic.profiles import PAPER_PROPORTIONS, SITE_PROFILES
from fl_research.synthetic.risk_model import DEFAULT_MODEL, PAPER_CALIBRATED_MODEL, RiskModel, site_intercept
from fl_research.synthetic.truth_attribution import (
    feature_attributions,
    group_shares,
    probability_at,
    risk_inputs,
    site_intercepts,
)
from shared_model.evaluation.explanation import PAPER_FEATURE_SHARES

PROFILES = {p.name: p for p in SITE_PROFILES}


def _paper_sample(model: RiskModel, total: int, seed: int) -> pd.DataFrame:
    frames = []
    for i, (profile, share) in enumerate(zip(SITE_PROFILES, PAPER_PROPORTIONS, strict=True)):
        df = sample_patients(int(total * share), site=profile, seed=[seed, i], model=model)
        df["site"] = profile.name
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _shares(model: RiskModel, total: int = 14_000, seed: int = 41) -> dict[str, float]:
    df = _paper_sample(model, total, seed)
    return group_shares(feature_attributions(df, site_intercepts(df, PROFILES, model), model))


def test_attributions_are_complete_integrated_gradients() -> None:
    """Each patient's attributions add up to its probability minus the baseline patient's (the defining
    property of integrated gradients), and an input already at its baseline gets nothing."""
    model = PAPER_CALIBRATED_MODEL
    df = _paper_sample(model, 1_400, 3)
    intercepts = site_intercepts(df, PROFILES, model)
    inputs = risk_inputs(df)
    assert np.allclose(probability_at(inputs, intercepts, model), df["risk"].to_numpy())  # the generator's own
    mean = {f: v.mean(axis=0) for f, v in inputs.items()}
    attributions = feature_attributions(df, intercepts, model)
    baseline_risk = probability_at({f: np.broadcast_to(m, inputs[f].shape) for f, m in mean.items()},
                                   intercepts, model)
    gap = df["risk"].to_numpy() - baseline_risk
    assert np.abs(attributions.sum(axis=1).to_numpy() - gap).max() < 1e-3
    crude = feature_attributions(df, intercepts, model, steps=1)  # one point is not the path integral
    assert np.abs(crude.sum(axis=1).to_numpy() - gap).max() > 1e-3
    at_mean_age = df.assign(age=float(inputs["age"].mean()))
    assert np.abs(feature_attributions(at_mean_age, intercepts, model, baseline=mean)["age"]).max() < 1e-12


def test_calibrated_risk_function_attributes_like_the_paper_and_the_default_does_not() -> None:
    calibrated = _shares(PAPER_CALIBRATED_MODEL)
    for group, paper in PAPER_FEATURE_SHARES.items():
        assert abs(calibrated[group] - paper) < 0.05, (group, calibrated[group], paper)
    default = _shares(DEFAULT_MODEL)  # the demo's risk function is dominated by morphology
    assert default["location"] < 0.35 and default["morphology"] > 0.4


def test_calibrated_risk_function_keeps_the_paper_location_findings() -> None:
    df = _paper_sample(PAPER_CALIBRATED_MODEL, 20_000, 7)
    near = df["capsule_mm"] < 2.5
    assert df.loc[near, "llnm"].mean() > 0.72 > df.loc[~near, "llnm"].mean() + 0.3
    by_third = df.groupby("third")["llnm"].mean()
    assert by_third["upper"] > by_third["middle"] > by_third["lower"]
    assert 0.45 < df["llnm"].mean() < 0.6  # the paper's pooled prevalence is about 52%
    stages = df.loc[df["llnm"] == 1, "risk_stage"].value_counts()
    assert stages[1] > stages[2] > stages[3]
    for profile in SITE_PROFILES:  # the intercepts reach every site's target prevalence
        assert -30 < site_intercept(profile, PAPER_CALIBRATED_MODEL) < 30


def _tables_and_reports_digest(out: Path) -> str:
    """sha256 over the patients tables, the reports and the truth (features, labels, splits, geometry), leaving
    out the Monte Carlo modality bounds (`best_*`), whose last printed digit could depend on the machine's
    floating-point summation order rather than on the generator."""
    digest = hashlib.sha256()
    for path in sorted(out.rglob("*")):
        if not path.is_file() or path.suffix not in (".csv", ".txt"):
            continue
        digest.update(path.relative_to(out).as_posix().encode())
        if path.parent.name == "truth":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
            digest.update(table.drop(columns=[c for c in table if c.startswith("best_")]).to_csv(index=False).encode())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize(("profile", "expected"), [
    ("default", "3a1ccd3e9598438294a72f806334f8654642dfc475aa56fd57cbce1cb3497225"),
    ("paper", "3353d3da338a945746a55ca4ccec16c97218efecc52674e69b233a2efef4c038"),
])
def test_older_profiles_still_write_the_same_patients_truth_and_reports(tmp_path: Path, profile: str,
                                                                         expected: str) -> None:
    """Results measured on `default` and `paper` consortia stay reproducible: the tables, the truth and the
    reports of a fixed consortium are what the generator wrote before `paper-calibrated` existed."""
    generate_consortium(tmp_path, sites=7, patients=140, seed=5, image_size=128, workers=2, layout=profile)
    assert _tables_and_reports_digest(tmp_path) == expected


def test_paper_calibrated_consortium_records_its_truth_shares_and_writes_briefer_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c"
    assert synth_main(["--out", str(out), "--profile", "paper-calibrated", "--patients", "140", "--seed", "2",
                       "--image-size", "128", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "generator's feature-group shares (paper's): location" in printed and "(48.8%)" in printed
    data = json.loads((out / "consortium.json").read_text(encoding="utf-8"))
    assert data["arguments"]["profile"] == "paper-calibrated"
    assert data["risk_model"]["capsule_beta"] == PAPER_CALIBRATED_MODEL.capsule_beta
    shares = data["truth_shares"]
    assert shares["paper"] == PAPER_FEATURE_SHARES
    assert set(shares["pooled"]["all"]) == set(PAPER_FEATURE_SHARES)
    assert abs(sum(shares["pooled"]["all"].values()) - 1.0) < 1e-3
    assert shares["groups"]["location"] == ["capsule", "lobe", "third"]
    assert set(shares["sites"]) == set(PROFILES)
    for name, site in data["sites"].items():
        own = PROFILES[name].report.mention
        assert site["profile"]["report"]["mention"] == {k: round(v / 2, 6) for k, v in own.items()}
    truth = pd.concat(pd.read_csv(p) for p in (out / "truth").glob("*.csv"))
    reported = truth.loc[truth["has_report"] == 1, "report_reveals"].fillna("")
    assert reported.str.contains("size").mean() < 0.7  # the sites' own habits mention size in 90-95%
    assert reported.str.contains("node").all()  # the node finding (present or absent) is always known
