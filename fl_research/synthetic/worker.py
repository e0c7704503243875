"""Rendering one patient: images, masks and report, written into the patient's site folder.

Kept apart from the generator (no pandas or scikit-learn), so spawned worker processes start quickly.
Every patient has its own random streams, derived from (seed, site, patient), so the files do not depend
on which worker renders them or in which order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .dicom_io import StudyInfo, synthetic_uid, write_ultrasound_dicom
from .geometry import place_nodule
from .profiles import SiteProfile
from .render import NoduleLook, draw_anatomy, frame_layout, render_view
from .reports import ReportFacts, write_report


@dataclass(frozen=True)
class PatientJob:
    """Everything a worker needs to render one patient (small, picklable)."""

    seed: int
    site_index: int
    profile: SiteProfile
    site_dir: str
    image_size: int
    patient_index: int
    patient_id: str
    truth: dict[str, Any]
    has_report: bool
    has_trans: bool
    has_long: bool


def _study_date(rng: np.random.Generator) -> tuple[str, str]:
    day = np.datetime64("2018-01-01") + np.timedelta64(int(rng.integers(0, 6 * 365)), "D")
    hms = f"{int(rng.integers(8, 18)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    return str(day).replace("-", ""), hms


def _save_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path, format="PNG", compress_level=1)


def render_patient(job: PatientJob) -> dict[str, Any]:
    """Render and write one patient's images, masks and report; return what the truth table needs."""
    t = job.truth
    streams = np.random.SeedSequence([job.seed, job.site_index, 1, job.patient_index]).spawn(5)
    geo_rng, trans_rng, long_rng, report_rng, meta_rng = (np.random.default_rng(s) for s in streams)
    geom = place_nodule(
        width_mm=t["width_mm"],
        depth_mm=t["depth_mm"],
        length_mm=t["length_mm"],
        capsule_mm=t["capsule_mm"],
        third=t["third"],
        margin=t["margin"],
        rng=geo_rng,
    )
    anat = draw_anatomy(geom, geo_rng)
    look = NoduleLook(
        t["echogenicity"],
        t["composition"],
        t["margin"],
        bool(t["microcalcifications"]),
        float(t["size_mm"]),
        t["lobe"],
    )
    scanner = job.profile.scanner
    layout = frame_layout(job.image_size, scanner)
    base_spacing = scanner.base_spacing_mm * 256.0 / job.image_size
    site_dir = Path(job.site_dir)
    pid = job.patient_id
    date, tm = _study_date(meta_rng)
    site = job.profile.name
    study = StudyInfo(
        patient_id=pid,
        age=int(t["age"]),
        sex=t["sex"],
        study_date=date,
        study_time=tm,
        study_uid=synthetic_uid(job.seed, site, pid, "study"),
        series_uid=synthetic_uid(job.seed, site, pid, "series"),
        institution=job.profile.institution,
        accession=f"{site[-1].upper()}{job.seed % 1000:03d}{job.patient_index:07d}",
    )
    out: dict[str, Any] = {
        "patient_id": pid,
        "capsule_trans_mm": round(geom.capsule_trans_mm, 4),
        "capsule_long_mm": round(geom.capsule_long_mm, 4),
        "diffuse_disease": anat.diffuse_disease,
    }
    for instance, (view, has, rng) in enumerate(
        (("trans", job.has_trans, trans_rng), ("long", job.has_long, long_rng)), start=1
    ):
        if not has:
            out[f"{view}_spacing_mm"] = None
            continue
        rendered = render_view(view, geom, anat, look, scanner, layout, base_spacing, rng)
        write_ultrasound_dicom(
            site_dir / "images" / f"{pid}_{view}.dcm",
            rendered.pixels,
            layout=layout,
            spacing_mm=rendered.spacing_mm,
            scanner=scanner,
            study=study,
            view=view,
            instance=instance,
            sop_uid=synthetic_uid(job.seed, site, pid, view),
        )
        _save_mask(site_dir / "masks" / f"{pid}_{view}_nodule.png", rendered.nodule_mask)
        _save_mask(site_dir / "masks" / f"{pid}_{view}_thyroid.png", rendered.thyroid_mask)
        out[f"{view}_spacing_mm"] = rendered.spacing_mm
    reveals: list[str] = []
    if job.has_report:
        facts = ReportFacts(
            lobe=t["lobe"],
            third=t["third"],
            width_mm=t["width_mm"],
            depth_mm=t["depth_mm"],
            length_mm=t["length_mm"],
            size_mm=t["size_mm"],
            composition=t["composition"],
            echogenicity=t["echogenicity"],
            margin=t["margin"],
            microcalcifications=bool(t["microcalcifications"]),
            taller_than_wide=bool(t["taller_than_wide"]),
            node_finding=bool(t["node_finding"]),
            diffuse_disease=anat.diffuse_disease,
            study_date=date,
        )
        text, revealed = write_report(facts, job.profile, report_rng)
        (site_dir / "reports" / f"{pid}.txt").write_text(text, encoding="utf-8", newline="\n")
        reveals = sorted(revealed)
    out["report_reveals"] = reveals
    return out
