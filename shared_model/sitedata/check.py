"""`llnm-site check`: judge a whole site folder against the data contract and summarise what it holds.

A site operator runs this before joining a federation, so the report must be complete (every problem at
once, with its file, row and field) and safe (the folder is only ever read). `check_site` builds on
`shared_model.sitedata.contract.load_site` for the table and then, unless `deep=False`, opens every file the table
lists: reports must be UTF-8 text, images must decode with the same reader training uses
(`shared_model.sitedata.imaging`), masks must decode, match their image's size and not be empty. A file that fails
never stops the others being checked.

Nothing here writes: files are opened for reading only, nothing is cached, and the site folder is never used
as a working directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from shared_model.config.inputs import InputsConfig
from shared_model.sitedata.check_summary import MASK_KINDS, CheckReport, FileFacts, summarise
from shared_model.sitedata.contract import (
    PATIENTS_FILE,
    SPLITS,
    VIEWS,
    PatientRecord,
    Problem,
    Site,
    load_site,
    read_report_text,
)
from shared_model.sitedata.imaging import (
    FrameSpec,
    ImageReadError,
    UltrasoundImage,
    read_image,
    read_mask,
    select_region,
)


def check_site(
    site_dir: str | os.PathLike[str],
    *,
    deep: bool = True,
    frame: FrameSpec = "middle",
    workers: int | None = None,
    progress: bool | None = None,
    inputs: InputsConfig | None = None,
) -> CheckReport:
    """Check a site folder; never writes anything.

    `deep=False` checks the table only (fast: no file is decoded). `frame` is the cine frame that training
    will use, so that the check decodes exactly what training will. `workers` threads decode files in
    parallel (default: up to 4, bounded by the CPU count); `progress` shows a bar on stderr (default: only
    when stderr is a terminal, so piped or logged output stays clean). Raises `FileNotFoundError` or
    `NotADirectoryError` only when `site_dir` is not a folder. `inputs` (an experiment's) replaces the site's own
    declaration as what the table is judged against (`load_site`).
    """
    site = load_site(site_dir, inputs)
    problems = list(site.problems)
    facts: list[FileFacts] = []
    if deep and site.patients:
        facts = _check_files(site, frame, workers, progress)
        for fact in facts:
            problems.extend(fact.problems)
    # A table that could not be read as a whole (a missing column: every row is left out) makes every split empty;
    # saying so three more times would only hide the one real error.
    table_unreadable = any(p.level == "error" and p.file == PATIENTS_FILE and p.row in (None, 1)
                           for p in site.problems) and not site.patients
    if not table_unreadable:
        problems.extend(_split_warnings(site))
    # Errors first, then warnings; within each, whole-file problems first, then row by row (a stable sort keeps
    # each row's problems in column order).
    problems.sort(key=lambda p: (p.level != "error", p.row is not None, p.row or 0))
    summary = summarise(site, facts if deep else None, frame)
    return CheckReport(site=site.name, root=site.root, deep=deep, summary=summary, problems=problems)


# ---------------------------------------------------------------------------------------------- file checks


def _check_files(
    site: Site, frame: FrameSpec, workers: int | None, progress: bool | None
) -> list[FileFacts]:
    if workers is None:
        workers = max(1, min(4, os.cpu_count() or 1))
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(site.patients), desc=f"checking {site.name}", unit="patient", file=sys.stderr)
    results: list[FileFacts] = []
    try:
        if workers == 1:
            iterator: Iterator[FileFacts] = (_check_patient(site, p, frame) for p in site.patients)
            for fact in iterator:
                results.append(fact)
                if bar is not None:
                    bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llnm-check") as pool:
                for fact in pool.map(lambda p: _check_patient(site, p, frame), site.patients):
                    results.append(fact)
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results


def _check_patient(site: Site, patient: PatientRecord, frame: FrameSpec) -> FileFacts:
    """Decode one patient's report, images and masks; every failure becomes a Problem, nothing propagates."""
    facts = FileFacts()
    if patient.report is not None:
        facts.report_ok = _check_report(site, patient, facts.problems)
    for view in VIEWS:
        _check_view(site, patient, view, frame, facts)
    return facts


def _problem(
    site: Site, level: str, path: Path, patient: PatientRecord, column: str, message: str
) -> Problem:
    """A problem about a data file: named by its site-relative path and the table row that lists it."""
    text, relative = str(message), site.relative(path)
    # imaging's messages start with the path: don't repeat it.
    for prefix in (f"{path}: ", f"{path.resolve()}: "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    # Libraries quote the absolute path; the operator knows the file by its name in the table.
    text = text.replace(str(path.resolve()), relative).replace(str(path), relative)
    return Problem(level, relative, patient.row, column, f"{text} (patient {patient.patient_id})")


def _check_report(site: Site, patient: PatientRecord, problems: list[Problem]) -> bool:
    path = patient.report
    assert path is not None
    try:
        text = read_report_text(path)
    except OSError as exc:
        problems.append(
            _problem(site, "error", path, patient, "report", f"cannot be read: {exc.strerror or exc}")
        )
        return False
    except ValueError as exc:
        problems.append(_problem(site, "error", path, patient, "report", str(exc)))
        return False
    if not text.strip():
        problems.append(
            _problem(
                site,
                "warning",
                path,
                patient,
                "report",
                "is empty: the patient is used as if it had no report",
            )
        )
        return False
    return True


def _read_image_safely(
    site: Site,
    patient: PatientRecord,
    view: str,
    frame: FrameSpec,
    problems: list[Problem],
) -> UltrasoundImage | None:
    """Decode one view's image; a failure becomes an error naming the image file, never an exception."""
    files = patient.views[view]
    assert files.image is not None
    column = f"{view}_image"
    try:
        return read_image(files.image, frame=frame, table_spacing_mm=files.table_spacing_mm)
    except ImageReadError as exc:
        problems.append(_problem(site, "error", files.image, patient, column, str(exc)))
    except Exception as exc:  # a decoder bug must not hide the other patients' results
        problems.append(
            _problem(
                site,
                "error",
                files.image,
                patient,
                column,
                f"cannot be decoded ({type(exc).__name__}: {exc})",
            )
        )
    return None


def _check_view(site: Site, patient: PatientRecord, view: str, frame: FrameSpec, facts: FileFacts) -> None:
    files = patient.views[view]
    image: UltrasoundImage | None = None
    if files.image is not None:
        image = _read_image_safely(site, patient, view, frame, facts.problems)

    masks: dict[str, np.ndarray] = {}
    for kind in MASK_KINDS:
        path: Path | None = getattr(files, kind)
        column = f"{view}_{kind}"
        if path is None:
            continue
        facts.masks_ok[column] = False
        try:
            mask = read_mask(path, frame_index=image.frame_index if image is not None else None)
        except ImageReadError as exc:
            facts.problems.append(_problem(site, "error", path, patient, column, str(exc)))
            continue
        except Exception as exc:
            facts.problems.append(
                _problem(
                    site, "error", path, patient, column, f"cannot be decoded ({type(exc).__name__}: {exc})"
                )
            )
            continue
        ok = True
        if image is not None and mask.shape != (image.rows, image.columns):
            facts.problems.append(
                _problem(
                    site,
                    "error",
                    path,
                    patient,
                    column,
                    f"mask is {mask.shape[0]}x{mask.shape[1]} (rows x columns) but its image "
                    f"{site.relative(image.path)} is {image.rows}x{image.columns}",
                )
            )
            ok = False
        if not mask.any():
            facts.problems.append(
                _problem(site, "error", path, patient, column, "mask is empty (no non-zero pixel)")
            )
            ok = False
        facts.masks_ok[column] = ok
        if ok:
            masks[kind] = mask

    nodule, thyroid = masks.get("nodule_mask"), masks.get("thyroid_mask")
    if (
        nodule is not None
        and thyroid is not None
        and nodule.shape == thyroid.shape
        and not (nodule & thyroid).any()
    ):
        path = files.nodule_mask
        assert path is not None
        facts.problems.append(
            _problem(
                site,
                "warning",
                path,
                patient,
                f"{view}_nodule_mask",
                "nodule mask lies entirely outside the thyroid mask",
            )
        )

    # With several 2-D ultrasound regions, the calibration is that of the region holding the nodule (the
    # mask is only known after the image, so the region is re-chosen without decoding again).
    if image is not None and nodule is not None:
        rows, cols = np.nonzero(nodule)
        image = select_region(image, (float(rows.mean()), float(cols.mean())))

    if image is not None:
        if image.spacing_mm is None:
            source = (
                "the DICOM file has no ultrasound region calibration or PixelSpacing"
                if image.file_format == "dicom"
                else f"a {image.file_format.upper()} image carries no pixel size"
            )
            facts.problems.append(
                _problem(
                    site,
                    "warning",
                    image.path,
                    patient,
                    f"{view}_image",
                    f"uncalibrated: {source} and the table gives no {view}_row_spacing_mm/"
                    f"{view}_col_spacing_mm; distances stay in pixels",
                )
            )
        image.pixels = np.empty((0, 0), dtype=np.float32)  # keep the facts, free the frame
    facts.images[view] = image


def _split_warnings(site: Site) -> list[Problem]:
    """Splits that cannot serve their purpose: no labelled patient, or one class only (AUC undefined)."""
    warnings: list[Problem] = []
    for split in SPLITS:
        labels = [p.llnm for p in site.patients if p.split == split and p.llnm is not None]
        if not labels:
            total = sum(p.split == split for p in site.patients)
            detail = "no patients" if total == 0 else f"{total} patients, none labelled"
            warnings.append(
                Problem(
                    "warning",
                    PATIENTS_FILE,
                    None,
                    "split",
                    f"split {split!r} has no labelled patients ({detail})",
                )
            )
        elif len(set(labels)) == 1:
            which = "LLNM-positive" if labels[0] == 1 else "LLNM-negative"
            warnings.append(
                Problem(
                    "warning",
                    PATIENTS_FILE,
                    None,
                    "split",
                    f"split {split!r} has only {which} patients ({len(labels)}): "
                    "AUC and other two-class metrics are undefined there",
                )
            )
    return warnings
