"""llnm-synth: the synthetic seven-centre consortium.

The session's shared 210-patient consortium (conftest `small_consortium`: 7 sites, default image size,
written by the `llnm-synth` console script) is checked against the site data contract, the real DICOM/mask
readers, the hidden truth (capsule distance, size, shape and third measured back from the masks) and
consortium.json. (That every generated site passes the site checker, deep, is test_site_check's
`test_every_generated_site_passes`, on the same consortium.) Determinism and overwrite protection need
consortia of their own, written here: the smallest and lowest-resolution that cover what they check. The
generative effects are checked on 20,000 sampled patients without rendering.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from conftest import CONSORTIUM_PATIENTS, CONSORTIUM_SEED, CONSORTIUM_SITES
from scipy import ndimage

from fl_research.synthetic import (
    SITE_PROFILES,
    expected_risk,
    generate_consortium,
    sample_patients,
    site_sizes,
)
from fl_research.synthetic.cli import main as synth_main
from fl_research.synthetic.generator import CONTRACT_COLUMNS, DEFAULT_IMAGE_SIZE, TRUTH_COLUMNS
from fl_research.synthetic.risk_model import (
    CLINICAL_FEATURES,
    FEATURES,
    LONG_VIEW_FEATURES,
    TRANS_VIEW_FEATURES,
)

SITES = [f"site-{c}" for c in "abcdefg"]
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


@pytest.fixture(scope="module")
def consortium(small_consortium: Path) -> tuple[Path, dict]:
    """The shared consortium and the summary llnm-synth wrote for it (its consortium.json)."""
    return small_consortium, json.loads((small_consortium / "consortium.json").read_text(encoding="utf-8"))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _truth(out: Path, site: str) -> dict[str, dict[str, str]]:
    return {r["patient_id"]: r for r in _rows(out / "truth" / f"{site}.csv")}


def _hashes(folder: Path) -> dict[str, str]:
    result = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = Path(dirpath) / name
            result[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


# ------------------------------------------------------------------------------------------- layout / table


def test_site_folders_follow_the_contract(consortium) -> None:
    out, summary = consortium
    assert sorted(p.name for p in out.iterdir()) == sorted([*SITES, "truth", "consortium.json"])
    sizes = []
    for site in SITES:
        folder = out / site
        with (folder / "patients.csv").open(encoding="utf-8") as fh:
            header = fh.readline().strip().split(",")
        assert tuple(header) == CONTRACT_COLUMNS
        rows = _rows(folder / "patients.csv")
        truth = _truth(out, site)
        sizes.append(len(rows))
        assert [r["patient_id"] for r in rows] == list(truth)
        assert "name: " + site in (folder / "site.yaml").read_text(encoding="utf-8")
        for r in rows:
            t = truth[r["patient_id"]]
            assert 18 <= int(r["age"]) <= 90 and r["sex"] in ("F", "M")
            assert r["llnm"] == t["llnm"] and r["split"] == t["split"] in ("train", "val", "test")
            assert (r["risk_stage"] in ("1", "2", "3")) == (r["llnm"] == "1")
            assert bool(r["report"]) == (t["has_report"] == "1")
            for view in ("trans", "long"):
                cells = [r[f"{view}_image"], r[f"{view}_nodule_mask"], r[f"{view}_thyroid_mask"]]
                if t[f"has_{view}"] == "1":
                    assert all(cells) and all((folder / c).is_file() for c in cells)
                else:
                    assert cells == ["", "", ""]
            if r["report"]:
                assert (folder / r["report"]).read_text(encoding="utf-8").strip()
        # splits stratified by label: every split holds both classes at 30-patient sites
        labels = {(r["split"], r["llnm"]) for r in rows}
        if len(rows) >= 30:
            assert labels == {(s, y) for s in ("train", "val", "test") for y in ("0", "1")}
        n_train = sum(r["split"] == "train" for r in rows)
        assert 0.55 < n_train / len(rows) < 0.8
        # The site declares its training-patient count rounded up to two significant digits as public.
        public = yaml.safe_load((folder / "site.yaml").read_text(encoding="utf-8"))["public_patient_count"]
        assert n_train <= public < n_train * 1.1 + 1 and len(str(public).rstrip("0")) <= 2
        # the truth never lives inside a site folder
        assert not list(folder.rglob("*truth*"))
    assert sum(sizes) == 210 and sizes == site_sizes(210, 7)
    assert sizes[0] == max(sizes) and min(sizes) >= 8
    assert [summary["sites"][s]["n"] for s in SITES] == sizes
    truth_header = (out / "truth" / "site-a.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert tuple(truth_header) == TRUTH_COLUMNS


def test_missing_modalities_occur_but_are_rare(consortium) -> None:
    _, summary = consortium
    missing = {k: sum(summary["sites"][s]["missing"][k] for s in SITES) for k in ("report", "trans", "long")}
    assert sum(missing.values()) <= 40  # a few percent of 210 patients
    # across a larger sample all three kinds of missingness happen (checked on the truth of a bigger run
    # would be slow; the per-site probabilities are what drives it)
    probs = [(p.missing_report_prob, p.missing_view_prob) for p in SITE_PROFILES]
    assert all(0 < a < 0.1 and 0 < b < 0.1 for a, b in probs)


# ---------------------------------------------------------------------------------------------- DICOM files


def test_every_dicom_decodes_with_the_right_calibration(consortium) -> None:
    imaging = pytest.importorskip("shared_model.sitedata.imaging")
    out, summary = consortium
    seen_syntaxes, seen_photometric, negative_dx, extra_regions = set(), set(), set(), set()
    for site in SITES:
        truth = _truth(out, site)
        vendors = set()
        for r in _rows(out / site / "patients.csv"):
            for view in ("trans", "long"):
                if not r[f"{view}_image"]:
                    continue
                path = out / site / r[f"{view}_image"]
                ds = pydicom.dcmread(path)
                assert ds.Modality == "US" and ds.SOPClassUID == US_IMAGE_STORAGE
                assert ds.file_meta.MediaStorageSOPClassUID == US_IMAGE_STORAGE
                assert ds.PatientID == r["patient_id"]
                vendors.add((ds.Manufacturer, ds.ManufacturerModelName))
                seen_syntaxes.add(ds.file_meta.TransferSyntaxUID.name)
                seen_photometric.add(ds.PhotometricInterpretation)
                regions = ds.SequenceOfUltrasoundRegions
                tissue = [g for g in regions if g.RegionSpatialFormat == 1]
                assert len(tissue) == 1
                assert tissue[0].PhysicalUnitsXDirection == 3 and tissue[0].PhysicalUnitsYDirection == 3
                if tissue[0].PhysicalDeltaX < 0:
                    negative_dx.add(site)
                if len(regions) > 1:
                    extra_regions.add((site, tuple(sorted(g.RegionSpatialFormat for g in regions))))
                spacing = float(truth[r["patient_id"]][f"{view}_spacing_mm"])
                assert abs(tissue[0].PhysicalDeltaY) * 10 == pytest.approx(spacing, rel=1e-9)
                image = imaging.read_image(path)
                assert image.spacing_mm == pytest.approx((spacing, spacing), rel=1e-9)
                assert image.pixels.shape == (ds.Rows, ds.Columns)
                assert float(image.pixels.std()) > 5.0  # a real picture, not a blank frame
                for kind in ("nodule", "thyroid"):
                    mask = imaging.read_mask(out / site / r[f"{view}_{kind}_mask"], (ds.Rows, ds.Columns))
                    assert mask.any(), (path, kind)
        assert len(vendors) == 1
        assert summary["sites"][site]["vendor"]["manufacturer"] == next(iter(vendors))[0]
    assert {"Explicit VR Little Endian", "Implicit VR Little Endian", "RLE Lossless"} <= seen_syntaxes
    assert seen_photometric == {"MONOCHROME2", "RGB"}
    assert negative_dx == {"site-c"}
    assert {s for s, _ in extra_regions} == {"site-c", "site-f"}
    assert ("site-c", (0, 1)) in extra_regions and ("site-f", (1, 3)) in extra_regions


def test_spacing_varies_across_sites_within_the_documented_range(consortium) -> None:
    _, summary = consortium
    medians = {s: summary["sites"][s]["spacing_mm"]["trans"]["median"] for s in SITES}
    assert len(set(medians.values())) >= 4
    assert all(0.07 <= v <= 0.3 for v in medians.values()), medians
    for s in SITES:
        assert summary["sites"][s]["spacing_mm"]["long"]["median"] >= medians[s]  # the long view zooms out


# ----------------------------------------------------------------------------- images agree with the truth


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    assert arr.dtype == np.uint8 and set(np.unique(arr).tolist()) <= {0, 255}
    return arr > 0


def test_masks_encode_capsule_distance_size_shape_and_third(consortium) -> None:
    out, _ = consortium
    capsule_err, ttw_agree, third_agree, width_ratio, n_ete = [], [], [], [], 0
    for site in SITES:
        truth = _truth(out, site)
        for r in _rows(out / site / "patients.csv"):
            t = truth[r["patient_id"]]
            if r["trans_image"]:
                sp = float(t["trans_spacing_mm"])
                nod = _png(out / site / r["trans_nodule_mask"])
                thy = _png(out / site / r["trans_thyroid_mask"])
                rows, cols = np.nonzero(nod)
                width_ratio.append((np.ptp(cols) + 1) * sp / float(t["width_mm"]))
                ttw_agree.append(((np.ptp(rows) + 1) > (np.ptp(cols) + 1)) == (t["taller_than_wide"] == "1"))
                if t["margin"] == "extrathyroidal":
                    n_ete += 1
                    assert (nod & ~thy).any(), "an extrathyroidal nodule crosses the capsule"
                    assert float(t["capsule_mm"]) == 0.0
                else:
                    assert not (nod & ~thy).any()
                    inside = ndimage.distance_transform_edt(thy) * sp  # distance to the capsule, in mm
                    measured = float(inside[nod].min()) - sp / 2  # pixel centres to the outline
                    capsule_err.append(abs(measured - float(t["capsule_mm"])) / sp)
            if r["long_image"]:
                nod = _png(out / site / r["long_nodule_mask"])
                thy = _png(out / site / r["long_thyroid_mask"])
                lobe_cols = np.nonzero(thy.any(0))[0]
                centre = np.nonzero(nod)[1].mean()
                frac = (centre - lobe_cols.min()) / (np.ptp(lobe_cols) + 1)
                third = "upper" if frac < 1 / 3 else ("middle" if frac < 2 / 3 else "lower")
                third_agree.append(third == t["third"])
    assert np.median(capsule_err) < 1.0 and np.quantile(capsule_err, 0.95) < 1.6, np.quantile(
        capsule_err, 0.95
    )
    assert np.mean(ttw_agree) > 0.9
    assert np.mean(third_agree) > 0.9
    assert 0.85 < float(np.median(width_ratio)) < 1.2
    assert n_ete >= 3


def test_echogenicity_is_visible_relative_to_parenchyma(consortium) -> None:
    imaging = pytest.importorskip("shared_model.sitedata.imaging")
    out, _ = consortium
    contrast: dict[str, list[float]] = {}
    for site in ("site-a", "site-b", "site-g"):
        truth = _truth(out, site)
        for r in _rows(out / site / "patients.csv"):
            if not r["trans_image"]:
                continue
            t = truth[r["patient_id"]]
            px = imaging.read_image(out / site / r["trans_image"]).pixels
            nod = _png(out / site / r["trans_nodule_mask"])
            thy = _png(out / site / r["trans_thyroid_mask"])
            core = ndimage.binary_erosion(nod, iterations=2)
            ring = (
                ndimage.binary_dilation(nod, iterations=6) & thy & ~ndimage.binary_dilation(nod, iterations=2)
            )
            if core.sum() < 10 or ring.sum() < 10 or t["composition"] != "solid":
                continue
            contrast.setdefault(t["echogenicity"], []).append(float(px[core].mean() - px[ring].mean()))
    means = {k: float(np.mean(v)) for k, v in contrast.items()}
    assert means["markedly hypoechoic"] < means["hypoechoic"] < 0
    if "hyperechoic" in means:
        assert means["hyperechoic"] > means["hypoechoic"]


# ------------------------------------------------------------------------------------------------- reports


def test_reports_differ_by_site_and_carry_negations_and_the_node_finding(consortium) -> None:
    out, _ = consortium
    first_lines, negations, node_ok = {}, 0, []
    for site in SITES:
        truth = _truth(out, site)
        texts = []
        for r in _rows(out / site / "patients.csv"):
            if not r["report"]:
                continue
            text = (out / site / r["report"]).read_text(encoding="utf-8")
            texts.append(text)
            low = text.lower()
            negations += any(
                k in low
                for k in (
                    "no microcalc",
                    "no mc",
                    "calcif -",
                    "no calc",
                    "not taller",
                    "not irregular",
                    "not ttw",
                    "ttw-",
                    "no taller",
                )
            )
            t = truth[r["patient_id"]]
            reveals = set(t["report_reveals"].split(";"))
            assert "node" in reveals
            if t["node_finding"] == "1":
                node_ok.append(
                    ("node" in low or " ln" in low) and any(k in low for k in ("susp", "abnormal", "abn "))
                )
            if {"lobe", "third"} <= reveals:
                side = {"right": ("right", "rt lobe", "r lobe"), "left": ("left", "lt lobe", "l lobe")}
                assert any(word in low for word in side[t["lobe"]]), text
        first_lines[site] = {t.splitlines()[0][:12] for t in texts}
    assert negations >= 20
    assert len(node_ok) >= 10 and np.mean(node_ok) > 0.95  # a typo may hit a keyword, rarely
    # each site writes its own template: the opening words never coincide across sites
    openings = [frozenset(v) for v in first_lines.values()]
    for i in range(len(openings)):
        for j in range(i + 1, len(openings)):
            assert not (openings[i] & openings[j]), (SITES[i], SITES[j])


# ----------------------------------------------------------------------------------------- consortium.json


def test_consortium_json_records_parameters_and_sensible_aucs(consortium) -> None:
    out, _ = consortium
    data = json.loads((out / "consortium.json").read_text(encoding="utf-8"))
    assert data["seed"] == CONSORTIUM_SEED
    assert data["arguments"] == {"sites": CONSORTIUM_SITES, "patients": CONSORTIUM_PATIENTS,
                                 "seed": CONSORTIUM_SEED, "image_size": DEFAULT_IMAGE_SIZE, "profile": "default"}
    model = data["risk_model"]
    for key in ("capsule_beta", "third_beta", "margin_beta", "node_beta", "formula", "categories"):
        assert key in model
    for site in SITES:
        s = data["sites"][site]
        assert {
            "n",
            "role",
            "vendor",
            "intercept",
            "prevalence",
            "splits",
            "profile",
            "auc",
            "spacing_mm",
        } <= set(s)
        assert set(s["splits"]) == {"train", "val", "test"}
        assert sum(v["n"] for v in s["splits"].values()) == s["n"]
        assert set(s["auc"]) == {"all", "test"}
        assert {"scanner", "report"} <= set(s["profile"])
    pooled = data["pooled"]["auc"]["all"]
    for m in ("image", "report", "clinical"):
        assert pooled[m] is not None and pooled["bayes"] >= pooled[m] - 0.02, (m, pooled)
    assert pooled["image"] > pooled["clinical"] and pooled["report"] > pooled["clinical"]
    assert data["bayes_auc"]["pooled"]["all"] == pooled["bayes"]
    assert data["modality_auc"]["pooled"]["test"]["image"] == data["pooled"]["auc"]["test"]["image"]
    assert "_wall_seconds" not in data  # (the summary generate_consortium returns: see the determinism test)
    # site intercepts give the documented spread of prevalence
    targets = [p.target_prevalence for p in SITE_PROFILES]
    assert min(targets) <= 0.36 and max(targets) >= 0.64


# ---------------------------------------------------------------------------- determinism and overwriting


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    """The API (one worker) and the CLI (two workers) write byte-identical consortia for one seed. (Another
    seed giving other bytes is checked in the overwrite test below, which rewrites with another seed.)"""
    # sites a-e cover every encoding (explicit, implicit, RLE, RGB, negative delta, extra region)
    args = {"sites": 5, "patients": 40, "image_size": 128}
    summary = generate_consortium(tmp_path / "a", seed=9, workers=1, **args)
    cli = ["--out", str(tmp_path / "b"), "--sites", "5", "--patients", "40", "--seed", "9"]
    assert synth_main([*cli, "--image-size", "128", "--workers", "2", "--quiet"]) == 0
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert ha == hb and len(ha) > 200
    # The returned summary is what consortium.json holds (the JSON without run-time-only fields).
    data = json.loads((tmp_path / "a" / "consortium.json").read_text(encoding="utf-8"))
    assert "_wall_seconds" not in data and summary["pooled"] == data["pooled"]
    assert summary["sites"].keys() == data["sites"].keys()


def test_refuses_to_overwrite_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    args = {"sites": 2, "patients": 16, "image_size": 128, "workers": 1}
    generate_consortium(out, seed=1, **args)
    before = _hashes(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_consortium(out, seed=2, **args)
    assert synth_main(["--out", str(out), "--sites", "2", "--patients", "16", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _hashes(out) == before  # nothing was touched
    generate_consortium(out, seed=2, overwrite=True, **args)
    assert json.loads((out / "consortium.json").read_text())["seed"] == 2
    # Another seed, other bytes: the table, the images and the summary all change, and few files coincide.
    after = _hashes(out)
    assert "site-a/images/PA00001_trans.dcm" in before
    for name in ("site-a/patients.csv", "site-a/images/PA00001_trans.dcm", "consortium.json"):
        assert after[name] != before[name], name
    assert sum(before.get(k) == v for k, v in after.items()) < len(after) / 4
    # a folder holding something llnm-synth did not write is never cleared
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        generate_consortium(out, seed=3, overwrite=True, **args)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    # an empty existing folder is fine
    (tmp_path / "empty").mkdir()
    generate_consortium(tmp_path / "empty", seed=1, sites=1, patients=8, image_size=128, workers=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patients": 50}, ">= 56"),
        ({"sites": 1000}, "sites must be an integer from 1 to 999"),
        ({"image_size": 64}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"sites": 7, "patients": 210, "seed": 0, "image_size": 256, "workers": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_consortium(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- the generative risk model


def _pooled_sample(total: int, seed: int) -> pd.DataFrame:
    frames = []
    for i, (profile, n) in enumerate(zip(SITE_PROFILES, site_sizes(total, 7), strict=True)):
        df = sample_patients(n, site=profile, seed=seed + i)
        df["site"] = profile.name
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def test_capsule_distance_and_third_effects_follow_the_paper() -> None:
    df = _pooled_sample(20_000, seed=100)
    close = df["capsule_mm"] < 2.5
    assert df.loc[close, "llnm"].mean() > 0.72
    assert df.loc[~close, "llnm"].mean() < 0.5
    rate = df.groupby("third")["llnm"].mean()
    assert rate["upper"] > rate["lower"] and rate["middle"] > rate["lower"]
    upper_middle = df.loc[df["third"] != "lower", "llnm"].mean()
    assert upper_middle > rate["lower"] + 0.05
    # younger, male, bigger, microcalcified, report-only node finding: all riskier
    assert df.loc[df["age"] < 35, "llnm"].mean() > df.loc[df["age"] > 55, "llnm"].mean()
    assert df.loc[df["sex"] == "M", "llnm"].mean() > df.loc[df["sex"] == "F", "llnm"].mean()
    assert df.loc[df["size_mm"] > 10, "llnm"].mean() > df.loc[df["size_mm"] < 5, "llnm"].mean()
    assert (
        df.loc[df["microcalcifications"], "llnm"].mean() > df.loc[~df["microcalcifications"], "llnm"].mean()
    )
    assert df.loc[df["node_finding"], "llnm"].mean() > 0.85
    # cohort: adults, median age ~43, ~72 % female; stage 3 rarest among positives
    assert 40 <= df["age"].median() <= 46 and df["age"].min() >= 18
    assert 0.68 < (df["sex"] == "F").mean() < 0.78
    stages = df.loc[df["llnm"] == 1, "risk_stage"].value_counts()
    assert set(stages.index) == {1, 2, 3} and stages[3] < stages[2] < stages[1]
    assert (df.loc[df["llnm"] == 0, "risk_stage"] == 0).all()
    # non-IID prevalence: roughly 35 % to 65 % across sites
    prev = df.groupby("site")["llnm"].mean()
    assert prev.min() < 0.42 and prev.max() > 0.58


def test_bayes_auc_bounds_every_modality_on_a_large_sample() -> None:
    from sklearn.metrics import roc_auc_score

    profile = SITE_PROFILES[0]
    df = sample_patients(4000, site=profile, seed=7)
    rng = np.random.default_rng(0)
    n = len(df)
    image = {f: np.full(n, f in TRANS_VIEW_FEATURES | LONG_VIEW_FEATURES) for f in FEATURES}
    clinical = {f: np.full(n, f in CLINICAL_FEATURES) for f in FEATURES}
    report = {f: np.full(n, f in {"lobe", "third", "size", "margin", "node"}) for f in FEATURES}
    nothing = {f: np.zeros(n, bool) for f in FEATURES}
    everything = {f: np.ones(n, bool) for f in FEATURES}
    y = df["llnm"].to_numpy()
    bayes = roc_auc_score(y, df["risk"])
    aucs = {
        name: roc_auc_score(y, expected_risk(df, seen, profile, rng, draws=400))
        for name, seen in (("image", image), ("report", report), ("clinical", clinical))
    }
    assert bayes > aucs["image"] > aucs["clinical"] > 0.5
    assert bayes > aucs["report"] > aucs["clinical"]
    # seeing everything reproduces the true risk exactly; seeing nothing gives the site's mean risk
    assert np.allclose(
        expected_risk(df.iloc[:50], {k: v[:50] for k, v in everything.items()}, profile, rng, draws=10),
        df["risk"].iloc[:50],
    )
    flat = expected_risk(df.iloc[:50], {k: v[:50] for k, v in nothing.items()}, profile, rng, draws=4000)
    assert np.ptp(flat) < 1e-12 and abs(flat[0] - profile.target_prevalence) < 0.03


def test_site_sizes_spread_and_minimum() -> None:
    assert site_sizes(9836, 7) == sorted(site_sizes(9836, 7), reverse=True)
    assert sum(site_sizes(9836, 7)) == 9836
    assert site_sizes(56, 7) == [8] * 7
    assert min(site_sizes(70, 7)) == 8 and sum(site_sizes(70, 7)) == 70
    with pytest.raises(ValueError, match="at least 8"):
        site_sizes(55, 7)


def test_paper_layout_puts_three_quarters_in_two_development_hospitals() -> None:
    """`llnm-synth --profile paper`: 29,615 of the paper's 39,451 patients are in its two development hospitals;
    the layout scales with --patients and keeps the pooled prevalence near the paper's 52%."""
    from fl_research.synthetic.profiles import PAPER_PATIENTS, PAPER_PROPORTIONS, SITE_PROFILES, layout_proportions

    sizes = site_sizes(PAPER_PATIENTS, 7, proportions=PAPER_PROPORTIONS)
    assert sum(sizes) == PAPER_PATIENTS and abs(sum(sizes[:2]) - 29_615) < 0.01 * PAPER_PATIENTS
    small = site_sizes(9836, 7, proportions=PAPER_PROPORTIONS)
    assert sum(small) == 9836 and abs(sum(small[:2]) / 9836 - 0.75) < 0.01 and small == sorted(small, reverse=True)
    prevalence = sum(p.target_prevalence * w for p, w in zip(SITE_PROFILES, PAPER_PROPORTIONS, strict=True))
    assert 0.50 <= prevalence <= 0.54
    with pytest.raises(ValueError, match="--profile 'huge' is unknown"):
        layout_proportions("huge")


def test_more_than_seven_sites_are_seeded_variants_with_drawn_sizes() -> None:
    """Up to seven sites nothing changes; beyond, site-NNN varies hospital (k - 1) mod 7 (its dialect, scanner
    vendor and role kept, its case mix and scanner settings drawn), sizes are drawn log-normal with site-a the
    largest, and the same seed gives the same consortium."""
    import math

    from fl_research.synthetic.profiles import SITE_PROPORTIONS, site_sizes
    from fl_research.synthetic.variants import (
        consortium_profiles,
        consortium_proportions,
        dialect_of,
        patient_prefix,
    )

    assert consortium_profiles(7, seed=3) == SITE_PROFILES
    assert consortium_proportions("default", 7, seed=3) == SITE_PROPORTIONS
    profiles = consortium_profiles(100, seed=3)
    assert [p.name for p in profiles[6:9]] == ["site-g", "site-008", "site-009"] and profiles[-1].name == "site-100"
    assert profiles == consortium_profiles(100, seed=3) and profiles != consortium_profiles(100, seed=4)
    v = profiles[7]  # site-008 varies site-a
    assert dialect_of(v) == "site-a" and v.role == SITE_PROFILES[0].role
    assert v.scanner.manufacturer == SITE_PROFILES[0].scanner.manufacturer
    assert v.target_prevalence != SITE_PROFILES[0].target_prevalence
    assert patient_prefix(v) == "P008" and patient_prefix(SITE_PROFILES[0]) == "PA"
    props = consortium_proportions("default", 100, seed=3)
    assert len(props) == 100 and math.isclose(sum(props), 1.0) and list(props) == sorted(props, reverse=True)
    sizes = site_sizes(2100, 100, proportions=props)
    assert sum(sizes) == 2100 and min(sizes) >= 8 and max(sizes) > 4 * min(sizes)
    with pytest.raises(ValueError, match="describes 7 sites"):
        consortium_proportions("paper", 8, seed=0)
