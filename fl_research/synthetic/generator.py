"""Generate the synthetic seven-centre consortium (``llnm-synth``).

Layout written under ``out_dir``::

    site-a/ ... site-g/     one folder per site, in the site data contract (docs/site-data.md)
    truth/site-a.csv ...    hidden per-patient truth (features, true risk, best per-modality risk); models
                            never read it, tests and benchmarks check effects against it
    consortium.json         seed, every generative parameter, per-site and pooled statistics and AUCs

``patients`` is the total over all sites, spread by realistic site proportions (two large development
hospitals, five smaller external ones; drawn sizes and seeded variants of the seven beyond seven sites,
:mod:`fl_research.synthetic.variants`). Truth (features, labels, splits, missingness) is drawn in the
main process, one random stream per site; each patient's images, masks and report are rendered from the
patient's own random streams, in worker processes, so the output does not depend on the number of
workers and the same seed gives byte-identical files. Memory stays bounded: a worker holds one patient.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from shared_model.evaluation.explanation import PAPER_FEATURE_SHARES
from shared_model.sitedata.contract import coarse_count

from .annotation import Annotation, drawn_patients, withhold_masks
from .profiles import MIN_PATIENTS_PER_SITE, SiteProfile, site_sizes
from .render import frame_layout
from .risk_model import (
    CLINICAL_FEATURES,
    FEATURES,
    LONG_VIEW_FEATURES,
    RISK_MODELS,
    THIRDS,
    TRANS_VIEW_FEATURES,
    RiskModel,
    expected_risk,
    label_patients,
    sample_features,
    site_intercept,
)
from .truth_attribution import (
    IG_STEPS,
    PAPER_GROUP_OF_FEATURE,
    PAPER_GROUPS,
    feature_attributions,
    group_shares,
    site_intercepts,
)
from .variants import MAX_SITES, consortium_profiles, consortium_proportions, patient_prefix
from .worker import PatientJob, render_patient

GENERATOR_VERSION = 1
DEFAULT_PATIENTS = 700
_SITE_FOLDER = re.compile(r"site-([a-g]|\d{3})")
DEFAULT_IMAGE_SIZE = 256
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 128, 1024
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
MC_DRAWS = 1000
CONTRACT_COLUMNS = (
    "patient_id",
    "age",
    "sex",
    "llnm",
    "risk_stage",
    "split",
    "report",
    "trans_image",
    "trans_nodule_mask",
    "trans_thyroid_mask",
    "long_image",
    "long_nodule_mask",
    "long_thyroid_mask",
)
TRUTH_COLUMNS = (
    "patient_id",
    "split",
    "risk",
    "llnm",
    "risk_stage",
    "capsule_mm",
    "third",
    "lobe",
    "size_mm",
    "width_mm",
    "depth_mm",
    "length_mm",
    "taller_than_wide",
    "margin",
    "echogenicity",
    "composition",
    "microcalcifications",
    "node_finding",
    "age",
    "sex",
    "has_report",
    "has_trans",
    "has_long",
    "report_reveals",
    "trans_spacing_mm",
    "long_spacing_mm",
    "capsule_trans_mm",
    "capsule_long_mm",
    "diffuse_disease",
    "best_image",
    "best_report",
    "best_clinical",
)
MODALITIES = ("image", "report", "clinical")


def stratified_splits(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """train/val/test ~ 70/15/15 within each class, so every split keeps the site's prevalence.

    A class with at least 3 patients puts at least one in val and one in test; with 2, one in train and one
    in test; with 1, in train.
    """
    out = np.empty(len(labels), dtype=object)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n = len(idx)
        if n >= 3:
            n_val = max(1, round(SPLIT_FRACTIONS["val"] * n))
            n_test = max(1, round(SPLIT_FRACTIONS["test"] * n))
        else:
            n_val, n_test = 0, (1 if n == 2 else 0)
        n_train = n - n_val - n_test
        out[idx[:n_train]] = "train"
        out[idx[n_train : n_train + n_val]] = "val"
        out[idx[n_train + n_val :]] = "test"
    return out


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``overwrite``; then remove only what llnm-synth writes."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output folder {out} is not empty; pass --overwrite to replace a previous llnm-synth output"
            )
        ours = {"truth", "consortium.json"}
        entries = sorted(out.iterdir())
        foreign = [e.name for e in entries if e.name not in ours and not _SITE_FOLDER.fullmatch(e.name)]
        if foreign:
            raise FileExistsError(
                f"refusing to overwrite {out}: it holds entries llnm-synth did not write: {foreign[:5]}"
            )
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _run_jobs(
    jobs: list[PatientJob], workers: int, progress: Callable[[int, int], None] | None
) -> Iterator[dict[str, Any]]:
    total = len(jobs)

    def tick(i: int) -> None:
        if progress is not None and (i % 250 == 0 or i == total):
            progress(i, total)

    if workers <= 1 or total < 2:
        for i, job in enumerate(jobs, 1):
            yield render_patient(job)
            tick(i)
        return
    ctx = mp.get_context("spawn")  # safe even when the caller has threads (torch, grpc)
    with ctx.Pool(processes=min(workers, total)) as pool:
        for i, res in enumerate(pool.imap(render_patient, jobs, chunksize=4), 1):
            yield res
            tick(i)


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score  # imported here: rendering workers never need scikit-learn

    y = np.asarray(y)
    if len(y) == 0 or y.min() == y.max():
        return None
    return round(float(roc_auc_score(y, score)), 4)


def _seen_masks(df: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """Per modality, which risk features each patient's data shows."""
    n = len(df)
    has_t = df["has_trans"].to_numpy(bool)
    has_l = df["has_long"].to_numpy(bool)
    has_r = df["has_report"].to_numpy(bool)
    reveals = [set(r.split(";")) if r else set() for r in df["report_reveals"]]
    image = {f: (has_t & (f in TRANS_VIEW_FEATURES)) | (has_l & (f in LONG_VIEW_FEATURES)) for f in FEATURES}
    report = {f: has_r & np.array([f in r for r in reveals], dtype=bool) for f in FEATURES}
    clinical = {f: np.full(n, f in CLINICAL_FEATURES) for f in FEATURES}
    return {"image": image, "report": report, "clinical": clinical}


def _auc_block(df: pd.DataFrame) -> dict[str, Any]:
    y = df["llnm"].to_numpy(int)
    block: dict[str, Any] = {
        "n": len(df),
        "prevalence": round(float(y.mean()), 4) if len(y) else None,
        "bayes": _auc(y, df["risk"].to_numpy()),
    }
    for m in MODALITIES:
        block[m] = _auc(y, df[f"best_{m}"].to_numpy())
    return block


def _effects(df: pd.DataFrame) -> dict[str, Any]:
    """The paper's effects measured on the truth: capsule distance and thirds."""
    close = df["capsule_mm"] < 2.5
    return {
        "llnm_rate_capsule_lt_2_5mm": round(float(df.loc[close, "llnm"].mean()), 4) if close.any() else None,
        "llnm_rate_capsule_ge_2_5mm": round(float(df.loc[~close, "llnm"].mean()), 4)
        if (~close).any()
        else None,
        "share_capsule_lt_2_5mm": round(float(close.mean()), 4),
        "llnm_rate_by_third": {
            t: (
                round(float(df.loc[df["third"] == t, "llnm"].mean()), 4) if (df["third"] == t).any() else None
            )
            for t in THIRDS
        },
        "stage_counts": {str(s): int((df["risk_stage"] == s).sum()) for s in (1, 2, 3)},
    }


def _write_patients_csv(path: Path, df: pd.DataFrame, drawn: np.ndarray) -> None:
    """The site table; a patient whose masks were not drawn (`drawn` False) has empty mask cells."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CONTRACT_COLUMNS)
        for r, has_masks in zip(df.itertuples(index=False), drawn, strict=True):
            pid = r.patient_id
            views = []
            for view, has in (("trans", r.has_trans), ("long", r.has_long)):
                masks = [f"masks/{pid}_{view}_nodule.png", f"masks/{pid}_{view}_thyroid.png"]
                views += [f"images/{pid}_{view}.dcm", *(masks if has_masks else ["", ""])] if has else ["", "", ""]
            writer.writerow(
                [
                    pid,
                    int(r.age),
                    r.sex,
                    int(r.llnm),
                    int(r.risk_stage) if r.llnm else "",
                    r.split,
                    f"reports/{pid}.txt" if r.has_report else "",
                    *views,
                ]
            )


def _fmt(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{float(value):.6g}"
    return value


def _write_truth_csv(path: Path, df: pd.DataFrame) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(TRUTH_COLUMNS)
        for row in df[list(TRUTH_COLUMNS)].itertuples(index=False):
            writer.writerow([_fmt(v) if v is not None else "" for v in row])


def _validate(sites: int, patients: int, seed: int, image_size: int, workers: int) -> None:
    if not isinstance(sites, (int, np.integer)) or not 1 <= sites <= MAX_SITES:
        raise ValueError(f"sites must be an integer from 1 to {MAX_SITES}, got {sites!r}")
    if not isinstance(patients, (int, np.integer)) or patients < MIN_PATIENTS_PER_SITE * sites:
        raise ValueError(
            f"patients (the total over all sites) must be an integer >= "
            f"{MIN_PATIENTS_PER_SITE * sites} for {sites} sites, got {patients!r}"
        )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(image_size, (int, np.integer)) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {image_size!r}"
        )
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")


def draw_patients(
    *, sites: int, patients: int, seed: int, model: RiskModel, layout: str
) -> tuple[list[SiteProfile], list[pd.DataFrame]]:
    """Every site's patients before anything is rendered: features, label and stage, split, and which of the
    report and the two views exist (`generate_consortium`'s draw, exactly; images and reports come after)."""
    proportions = consortium_proportions(layout, sites, seed)
    profiles = consortium_profiles(sites, seed, layout)
    sizes = site_sizes(patients, sites, proportions=proportions)
    tables: list[pd.DataFrame] = []
    for si, (profile, n) in enumerate(zip(profiles, sizes, strict=True)):
        rng = np.random.default_rng([seed, si, 0])
        df = label_patients(sample_features(n, profile, rng, model), profile, rng, model)
        prefix = patient_prefix(profile)
        df.insert(0, "patient_id", [f"{prefix}{i + 1:05d}" for i in range(n)])
        df["split"] = stratified_splits(df["llnm"].to_numpy(), rng)
        df["has_report"] = rng.random(n) >= profile.missing_report_prob
        missing_view = rng.random(n) < profile.missing_view_prob
        which = rng.integers(0, 2, n)
        df["has_trans"] = ~(missing_view & (which == 0))
        df["has_long"] = ~(missing_view & (which == 1))
        tables.append(df)
    return profiles, tables


def generate_consortium(
    out_dir: str | os.PathLike[str],
    *,
    sites: int = 7,
    patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    workers: int | None = None,
    overwrite: bool = False,
    model: RiskModel | None = None,
    layout: str = "default",
    progress: Callable[[int, int], None] | None = None,
    annotation: Annotation | None = None,
) -> dict[str, Any]:
    """Write a synthetic consortium of ``sites`` sites and ``patients`` patients in total; return its summary.

    ``layout`` names the profile (``llnm-synth --profile``): ``default``, ``paper`` (two development hospitals
    with 75% of the patients, as in the paper; see ``profiles.LAYOUTS``) or ``paper-calibrated`` (the paper's
    layout, a risk function whose own attribution matches the paper's feature shares, and briefer reports).
    ``model`` overrides the profile's risk function (``risk_model.RISK_MODELS``). ``annotation`` says which patients
    keep drawn masks in their site folder (default: all; `annotation.Annotation`).
    The summary is also written to ``out_dir/consortium.json``, last, so its presence marks a complete
    output. ``workers`` (default: CPU count) only changes speed, never the files.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    _validate(sites, patients, seed, image_size, workers)
    model = RISK_MODELS[layout] if model is None else model
    out = Path(out_dir)
    _prepare_output(out, overwrite)
    started = time.perf_counter()
    profiles, tables = draw_patients(sites=sites, patients=patients, seed=seed, model=model, layout=layout)
    annotation = annotation or Annotation()
    annotation.check_sites([p.name for p in profiles])
    jobs: list[PatientJob] = []
    for si, (profile, df) in enumerate(zip(profiles, tables, strict=True)):
        site_dir = out / profile.name
        for sub in ("images", "masks", "reports"):
            (site_dir / sub).mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(df.to_dict("records")):
            truth = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
            jobs.append(
                PatientJob(
                    seed,
                    si,
                    profile,
                    str(site_dir),
                    image_size,
                    i,
                    row["patient_id"],
                    truth,
                    bool(row["has_report"]),
                    bool(row["has_trans"]),
                    bool(row["has_long"]),
                )
            )

    rendered = {r["patient_id"]: r for r in _run_jobs(jobs, workers, progress)}
    (out / "truth").mkdir(exist_ok=True)
    site_summaries: dict[str, Any] = {}
    drawn_counts: dict[str, int] = {}
    scored: list[pd.DataFrame] = []
    for si, (profile, df) in enumerate(zip(profiles, tables, strict=True)):
        extra = pd.DataFrame([rendered[p] for p in df["patient_id"]])
        df = df.merge(extra, on="patient_id", how="left", validate="one_to_one")
        df["report_reveals"] = [";".join(r) for r in df["report_reveals"]]
        seen = _seen_masks(df)
        mc_rng = np.random.default_rng([seed, si, 2])
        for m in MODALITIES:
            df[f"best_{m}"] = expected_risk(df, seen[m], profile, mc_rng, model, draws=MC_DRAWS)
        site_dir = out / profile.name
        drawn = drawn_patients(annotation, profile.name, len(df), seed, si)
        withhold_masks(site_dir, out / "truth" / "masks" / profile.name, list(df["patient_id"]), drawn)
        drawn_counts[profile.name] = int(drawn.sum())
        _write_patients_csv(site_dir / "patients.csv", df, drawn)
        (site_dir / "site.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": profile.name,
                    "description": f"{profile.institution}: {profile.description} (synthetic)",
                    "contact": "synthetic data generated by llnm-synth",
                    # What the site declares public about its size: its training patients rounded up to
                    # two significant digits (patient-level DP-SGD is parameterised by it, docs/privacy.md).
                    "public_patient_count": coarse_count(max(1, int((df["split"] == "train").sum()))),
                },
                sort_keys=False,
            ),
            encoding="utf-8",
        )
        _write_truth_csv(out / "truth" / f"{profile.name}.csv", df)
        site_summaries[profile.name] = _site_summary(profile, df, model, image_size)
        df["site"] = profile.name
        scored.append(df)

    pooled = pd.concat(scored, ignore_index=True)
    summary: dict[str, Any] = {
        "generator": "llnm-synth",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "arguments": {
            "sites": int(sites),
            "patients": int(patients),
            "seed": int(seed),
            "image_size": int(image_size),
            "profile": layout,
        },
        "patients_note": "patients is the total over all sites, spread by site_proportions (min "
        f"{MIN_PATIENTS_PER_SITE} per site)",
        "site_proportions": list(consortium_proportions(layout, sites, seed)[:sites]),
        "risk_model": model.to_dict(),
        "drawn_masks": annotation.to_dict() | {"patients_with_masks": drawn_counts},
        "modalities": {
            "image": sorted(TRANS_VIEW_FEATURES | LONG_VIEW_FEATURES),
            "image_trans_view": sorted(TRANS_VIEW_FEATURES),
            "image_long_view": sorted(LONG_VIEW_FEATURES),
            "report": "features its text mentions (per patient) plus the report-only node finding",
            "clinical": sorted(CLINICAL_FEATURES),
            "auc_definition": "AUC of E[true risk | the modality's information] (Monte Carlo over unseen "
            f"features, {MC_DRAWS} draws, site known); bayes = AUC of the true risk",
        },
        "sites": site_summaries,
        "pooled": {
            "n": len(pooled),
            "prevalence": round(float(pooled["llnm"].mean()), 4),
            "splits": _split_counts(pooled),
            "auc": {"all": _auc_block(pooled), "test": _auc_block(pooled[pooled["split"] == "test"])},
            "effects": _effects(pooled),
        },
    }
    summary["truth_shares"] = _truth_shares(pooled, {p.name: p for p in profiles}, model)
    summary["bayes_auc"], summary["modality_auc"] = _auc_digest(summary)
    (out / "consortium.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    summary["_wall_seconds"] = round(time.perf_counter() - started, 2)  # returned only, not written
    return summary


def _truth_shares(pooled: pd.DataFrame, profiles: dict[str, SiteProfile], model: RiskModel) -> dict[str, Any]:
    """The generator's own feature-group shares (`truth_attribution`), beside the paper's."""
    attributions = feature_attributions(pooled, site_intercepts(pooled, profiles, model), model)

    def shares(mask: pd.Series) -> dict[str, float] | None:
        part = attributions[mask.to_numpy()]
        return {k: round(v, 4) for k, v in group_shares(part).items()} if len(part) else None

    test = pooled["split"] == "test"
    return {
        "method": "integrated gradients of the true LLNM probability from the consortium's mean input "
        f"({IG_STEPS}-point midpoint rule); a group's share of each patient's total |attribution|, averaged "
        "over patients",
        "groups": {g: sorted(f for f, h in PAPER_GROUP_OF_FEATURE.items() if h == g) for g in PAPER_GROUPS},
        "paper": dict(PAPER_FEATURE_SHARES),
        "pooled": {"all": shares(pooled["split"].notna()), "test": shares(test)},
        "sites": {name: shares(pooled["site"] == name) for name in profiles},
    }


def _auc_digest(summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Short views of the reference AUCs: Bayes-optimal, and best reachable per modality (all / test)."""

    def pick(auc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        bayes = {part: auc[part]["bayes"] for part in ("all", "test")}
        modal = {part: {m: auc[part][m] for m in MODALITIES} for part in ("all", "test")}
        return bayes, modal

    pooled_b, pooled_m = pick(summary["pooled"]["auc"])
    sites = {name: pick(site["auc"]) for name, site in summary["sites"].items()}
    return (
        {"pooled": pooled_b, "sites": {k: v[0] for k, v in sites.items()}},
        {"pooled": pooled_m, "sites": {k: v[1] for k, v in sites.items()}},
    )


def _split_counts(df: pd.DataFrame) -> dict[str, Any]:
    out = {}
    for split in SPLIT_FRACTIONS:
        part = df[df["split"] == split]
        out[split] = {
            "n": len(part),
            "positives": int(part["llnm"].sum()),
            "prevalence": round(float(part["llnm"].mean()), 4) if len(part) else None,
        }
    return out


def _spacing_stats(values: Iterable[Any]) -> dict[str, float] | None:
    arr = np.array([v for v in values if v is not None and not pd.isna(v)], dtype=float)
    if len(arr) == 0:
        return None
    return {
        "min": round(float(arr.min()), 5),
        "median": round(float(np.median(arr)), 5),
        "max": round(float(arr.max()), 5),
    }


def _site_summary(
    profile: SiteProfile, df: pd.DataFrame, model: RiskModel, image_size: int
) -> dict[str, Any]:
    layout = frame_layout(image_size, profile.scanner)
    return {
        "n": len(df),
        "role": profile.role,
        "institution": profile.institution,
        "vendor": {"manufacturer": profile.scanner.manufacturer, "model": profile.scanner.model},
        "target_prevalence": profile.target_prevalence,
        "intercept": round(site_intercept(profile, model), 6),
        "prevalence": round(float(df["llnm"].mean()), 4),
        "splits": _split_counts(df),
        "missing": {
            "report": int((~df["has_report"]).sum()),
            "trans": int((~df["has_trans"]).sum()),
            "long": int((~df["has_long"]).sum()),
        },
        "frame": {
            "rows": layout.rows,
            "cols": layout.cols,
            "tissue_region_r0_r1_c0_c1": list(layout.region),
            "doppler_region": list(layout.doppler) if layout.doppler else None,
        },
        "spacing_mm": {
            "trans": _spacing_stats(df["trans_spacing_mm"]),
            "long": _spacing_stats(df["long_spacing_mm"]),
        },
        "profile": profile.to_dict(),
        "auc": {"all": _auc_block(df), "test": _auc_block(df[df["split"] == "test"])},
        "effects": _effects(df),
    }
