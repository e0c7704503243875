"""Building a site's tensors from its folder (uncached): two passes over the views, then the reports.

Pass 1 estimates the site's intensity range from an evenly spread, deterministic subset of views; pass 2
computes every view's features with it (:func:`shared_model.sitedata.preprocessing.preprocess_view`); then every
report goes through the frozen text encoder, loaded once. A patient whose image, mask or report cannot be read
is skipped and logged (never a crash); a view without image or nodule mask is marked missing, never invented.
Callers use :func:`shared_model.sitedata.cache.build_site_tensors`, which caches the result.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_model.config import PreprocessConfig
from shared_model.sitedata.contract import PATIENTS_FILE, VIEWS, PatientRecord, Site, read_report_text
from shared_model.sitedata.preprocessing import (
    ViewFeatures,
    intensity_sample_region,
    preprocess_view,
    site_intensity_range,
)
from shared_model.sitedata.tensors import SiteTensors, patient_scalars, view_scalars

logger = logging.getLogger(__name__)

#: Decoded frames kept in memory between the range pass and the feature pass.
_KEEP_DECODED_BYTES = 1 << 30


@dataclass
class _ViewJob:
    """One view to decode: everything needed, nothing to look up."""

    patient: int
    view: int
    image: Path
    nodule_mask: Path | None
    thyroid_mask: Path | None
    table_spacing_mm: tuple[float, float] | None


@dataclass
class _Decoded:
    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    spacing_source: str
    nodule: np.ndarray | None
    thyroid: np.ndarray | None


@dataclass
class _ViewOutcome:
    patient: int
    view: int
    features: ViewFeatures | None = None
    samples: np.ndarray | None = None
    decoded: _Decoded | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _decode(job: _ViewJob, cfg: PreprocessConfig) -> _Decoded:
    """Read the masks first (the nodule centroid selects the calibrated ultrasound region), then the image."""
    from shared_model.sitedata.imaging import ImageReadError, read_image, read_mask

    nodule = read_mask(job.nodule_mask) if job.nodule_mask is not None else None
    hint = None
    if nodule is not None and nodule.any():
        rows, cols = np.nonzero(nodule)
        hint = (float(rows.mean()), float(cols.mean()))
    image = read_image(job.image, frame=cfg.frame, table_spacing_mm=job.table_spacing_mm, region_hint=hint)
    shape = image.pixels.shape
    thyroid = read_mask(job.thyroid_mask, expected_shape=shape) if job.thyroid_mask is not None else None
    if nodule is not None and nodule.shape != shape:
        raise ImageReadError(
            f"{job.nodule_mask}: mask is {nodule.shape[0]}x{nodule.shape[1]} (rows x columns) but its image "
            f"{job.image.name} is {shape[0]}x{shape[1]}"
        )
    return _Decoded(image.pixels, image.spacing_mm, image.spacing_source, nodule, thyroid)


def _run_job(job: _ViewJob, cfg: PreprocessConfig, mode: str, intensity_range: tuple[float, float] | None,
             decoded: _Decoded | None = None, keep: bool = False) -> _ViewOutcome:
    """Decode (unless given) and either sample tissue pixels (``mode="sample"``) or compute features."""
    from shared_model.sitedata.imaging import ImageReadError

    out = _ViewOutcome(job.patient, job.view)
    try:
        if decoded is None:
            decoded = _decode(job, cfg)
        if mode == "sample":
            region = intensity_sample_region(
                decoded.pixels.shape, decoded.nodule, decoded.thyroid, decoded.spacing_mm, cfg.crop_margin
            )
            values = decoded.pixels[region]
            step = max(1, math.ceil(values.size / cfg.range_samples_per_view))
            out.samples = np.ascontiguousarray(values[::step])
            if keep:
                out.decoded = decoded
        else:
            assert intensity_range is not None
            out.features = preprocess_view(
                decoded.pixels, decoded.nodule, decoded.thyroid, decoded.spacing_mm, cfg, intensity_range
            )
            if decoded.spacing_mm is None:
                out.notes.append("no calibration in the file or the table")
            if out.features is None:
                out.notes.append("nodule mask is empty: view marked missing")
    except (ImageReadError, ValueError, OSError) as exc:
        out.error = str(exc)
    return out





def build_tensors(site: Site, cfg: PreprocessConfig, *, progress: bool) -> SiteTensors:
    """The tensors of the loaded ``site``'s patients under ``cfg``; ``meta`` records the intensity range and
    every skipped patient with its reasons."""
    from shared_model.model.text_encoder import encode_reports, load_text_encoder

    patients = site.patients
    jobs, view_notes = _view_jobs(patients)
    errors: dict[int, list[str]] = {}
    range_jobs = _range_jobs(jobs, cfg.range_max_views)
    kept: dict[tuple[int, int], _Decoded] = {}
    bar = _progress(len(range_jobs) + len(jobs), f"{site.name}: preprocess", progress and bool(jobs))
    try:
        if cfg.inputs.images:
            intensity_range, range_views = _intensity_pass(site, range_jobs, cfg, bar, kept, errors)
        else:  # no image modality: the table lists no views, nothing to decode
            intensity_range, range_views = (0.0, 255.0), 0
        # Patients that already failed are not decoded again.
        todo = [job for job in jobs if job.patient not in errors]
        bar.total = len(range_jobs) + len(todo)
        features = _feature_pass(todo, cfg, intensity_range, bar, kept, errors, view_notes)
    finally:
        bar.close()
    kept.clear()

    texts = _read_reports(patients, errors)
    for p_index in sorted(errors):
        patient = patients[p_index]
        logger.warning("%s: skipping patient %s (row %d of %s): %s", site.name, patient.patient_id,
                       patient.row, PATIENTS_FILE, "; ".join(errors[p_index]))
    keep = [i for i in range(len(patients)) if i not in errors]
    if cfg.inputs.reports:
        tokenizer, model = load_text_encoder(cfg.text)
        hidden, text_mask, present = encode_reports([texts[i] for i in keep], cfg.text, tokenizer, model)
        del model, tokenizer
    else:  # no report modality: no encoder is loaded and the report stream is empty
        hidden = torch.zeros(len(keep), 0, 0)
        text_mask = torch.zeros(len(keep), 0)
        present = torch.zeros(len(keep), dtype=torch.bool)

    tensors = _assemble(site, cfg, keep, features, view_notes, hidden, text_mask, present)
    tensors.meta.update(
        intensity_range=[float(intensity_range[0]), float(intensity_range[1])],
        intensity_range_views=range_views,
        skipped=[
            {"patient_id": patients[i].patient_id, "row": patients[i].row, "reasons": errors[i]}
            for i in sorted(errors)
        ] + [{"patient_id": None, "row": None, "reasons": [line]} for line in skipped_rows(site)],
        warnings=[p.format() for p in site.problems if p.level == "warning"],
    )
    return tensors


def _view_jobs(patients: list[PatientRecord]) -> tuple[list[_ViewJob], list[list[list[str]]]]:
    """A job per view that has an image and a nodule mask, and per patient and view its notes so far."""
    jobs: list[_ViewJob] = []
    view_notes: list[list[list[str]]] = [[[] for _ in VIEWS] for _ in patients]
    for p_index, patient in enumerate(patients):
        for v_index, view in enumerate(VIEWS):
            files = patient.views[view]
            if files.image is None:
                continue
            if files.nodule_mask is None:
                view_notes[p_index][v_index].append("no nodule mask: view marked missing")
                continue
            jobs.append(_ViewJob(p_index, v_index, files.image, files.nodule_mask, files.thyroid_mask,
                                 files.table_spacing_mm))
    return jobs, view_notes


def _range_jobs(jobs: list[_ViewJob], max_views: int) -> list[_ViewJob]:
    """An evenly spread, deterministic subset of at most ``max_views`` jobs."""
    if len(jobs) <= max_views:
        return list(jobs)
    picks = np.unique(np.linspace(0, len(jobs) - 1, max_views).round().astype(int))
    return [jobs[i] for i in picks]


def _intensity_pass(
    site: Site, jobs: list[_ViewJob], cfg: PreprocessConfig, bar: Any, kept: dict[tuple[int, int], _Decoded],
    errors: dict[int, list[str]],
) -> tuple[tuple[float, float], int]:
    """Pass 1: the site's intensity range, and from how many views it was estimated."""
    samples: list[np.ndarray] = []
    for out in _map_jobs(jobs, cfg, "sample", None, bar, kept, [_KEEP_DECODED_BYTES]):
        if out.error is not None:
            errors.setdefault(out.patient, []).append(f"{VIEWS[out.view]} view: {out.error}")
        elif out.samples is not None:
            samples.append(out.samples)
    if not samples:
        logger.warning("%s: no decodable view to estimate the intensity range from; using 0..255", site.name)
        return (0.0, 255.0), 0
    return site_intensity_range(
        samples, cfg.intensity_percentiles, max_samples_per_image=cfg.range_samples_per_view
    ), len(samples)


def _feature_pass(
    jobs: list[_ViewJob], cfg: PreprocessConfig, intensity_range: tuple[float, float], bar: Any,
    kept: dict[tuple[int, int], _Decoded], errors: dict[int, list[str]], view_notes: list[list[list[str]]],
) -> dict[tuple[int, int], ViewFeatures]:
    """Pass 2: the features of every view, by (patient, view)."""
    features: dict[tuple[int, int], ViewFeatures] = {}
    for out in _map_jobs(jobs, cfg, "features", intensity_range, bar, kept, [0]):
        if out.error is not None:
            errors.setdefault(out.patient, []).append(f"{VIEWS[out.view]} view: {out.error}")
            continue
        view_notes[out.patient][out.view].extend(out.notes)
        if out.features is not None:
            features[(out.patient, out.view)] = out.features
            view_notes[out.patient][out.view].extend(out.features.notes)
    return features


def _read_reports(patients: list[PatientRecord], errors: dict[int, list[str]]) -> dict[int, str | None]:
    """Every patient's report text (None where it has none); an unreadable one is an error of its patient."""
    texts: dict[int, str | None] = {}
    for p_index, patient in enumerate(patients):
        if patient.report is None:
            texts[p_index] = None
            continue
        try:
            texts[p_index] = _read_report(patient.report)
        except (OSError, ValueError) as exc:
            errors.setdefault(p_index, []).append(f"report: {exc}")
    return texts


def _map_jobs(
    jobs: list[_ViewJob], cfg: PreprocessConfig, mode: str, intensity_range: tuple[float, float] | None,
    bar: Any, kept: dict[tuple[int, int], _Decoded], keep_budget: list[int],
) -> Iterable[_ViewOutcome]:
    """Run jobs one by one, reusing frames decoded earlier and keeping new ones while ``keep_budget`` (bytes)
    lasts; yield the outcomes."""
    for job in jobs:
        decoded = kept.pop((job.patient, job.view), None)
        out = _run_job(job, cfg, mode, intensity_range, decoded=decoded, keep=keep_budget[0] > 0)
        if out.decoded is not None:
            kept[(job.patient, job.view)] = out.decoded
            keep_budget[0] -= out.decoded.pixels.nbytes
            out.decoded = None
        bar.update(1)
        yield out


def _read_report(path: Path) -> str:
    try:
        return read_report_text(path)
    except ValueError as exc:
        raise ValueError(f"{path}: report {exc}") from None


def _progress(total: int, description: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="view", file=sys.stderr, disable=not enabled, leave=False)


def skipped_rows(site: Site) -> list[str]:
    """One line per table row that ``load_site`` left out, with all its errors."""
    loaded = {p.row for p in site.patients}
    by_row: dict[int, list[str]] = {}
    for problem in site.problems:
        if problem.level == "error" and problem.row is not None and problem.row not in loaded:
            where = f"{problem.field}: " if problem.field else ""
            by_row.setdefault(problem.row, []).append(f"{where}{problem.message}")
    return [f"row {row} of {PATIENTS_FILE} ({'; '.join(msgs)})" for row, msgs in sorted(by_row.items())]


def _assemble(
    site: Site, cfg: PreprocessConfig, keep: list[int], features: dict[tuple[int, int], ViewFeatures],
    view_notes: list[list[list[str]]], hidden: torch.Tensor, text_mask: torch.Tensor, present: torch.Tensor,
) -> SiteTensors:
    inputs = cfg.inputs
    names = inputs.feature_names
    n, nv = len(keep), len(VIEWS)
    s = cfg.image_size if inputs.images else 0  # no image modality: nothing to store
    image = torch.zeros(n, nv, 3, s, s, dtype=torch.float32)
    view_mask = torch.zeros(n, nv, dtype=torch.float32)
    clinical = torch.zeros(n, nv, len(names), dtype=torch.float32)
    clinical_mask = torch.zeros_like(clinical)
    capsule = torch.full((n, nv), math.nan, dtype=torch.float32)
    area = torch.full((n, nv), math.nan, dtype=torch.float32)
    calibrated = torch.zeros(n, nv, dtype=torch.bool)
    location_present = torch.zeros(n, nv, dtype=torch.bool)
    llnm = torch.full((n,), -1.0, dtype=torch.float32)
    stage = torch.full((n,), -1, dtype=torch.int64)
    rows = torch.zeros(n, dtype=torch.int64)
    patients: list[PatientRecord] = [site.patients[i] for i in keep]
    for k, (p_index, patient) in enumerate(zip(keep, patients, strict=True)):
        if patient.llnm is not None:
            llnm[k] = float(patient.llnm)
        if patient.risk_stage is not None:
            stage[k] = patient.risk_stage - 1
        rows[k] = patient.row
        # The clinical variables are patient-level; they are given for both views.
        for name, value in patient_scalars(patient, inputs).items():
            j = names.index(name)
            clinical[k, :, j] = value
            clinical_mask[k, :, j] = 1.0
        for v_index in range(nv):
            feat = features.get((p_index, v_index))
            if feat is None:
                continue
            image[k, v_index] = torch.from_numpy(feat.channels)
            view_mask[k, v_index] = 1.0
            for name, value in view_scalars(feat).items():
                j = names.index(name)
                clinical[k, v_index, j] = value
                clinical_mask[k, v_index, j] = 1.0
            if feat.capsule_distance_mm is not None:
                capsule[k, v_index] = feat.capsule_distance_mm
            area[k, v_index] = feat.nodule_area_mm2
            calibrated[k, v_index] = feat.calibrated
            location_present[k, v_index] = not feat.thyroid_missing
    return SiteTensors(
        site=site.name,
        patient_ids=[p.patient_id for p in patients],
        splits=[p.split for p in patients],
        image=image,
        view_mask=view_mask,
        text=hidden.to(torch.float32),
        text_mask=text_mask.to(torch.float32),
        clinical=clinical,
        clinical_mask=clinical_mask,
        llnm=llnm,
        stage=stage,
        extras={
            "capsule_distance": capsule,
            "nodule_area": area,
            "calibrated": calibrated,
            "location_present": location_present,
            "report_present": present.to(torch.bool),
            "row": rows,
            "view_notes": [view_notes[i] for i in keep],
        },
        meta={"site": site.name, "views": list(VIEWS), "clinical_features": list(names),
              "inputs": inputs.to_dict()},
    )

