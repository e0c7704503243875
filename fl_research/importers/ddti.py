"""DDTI, the Digital Database of Thyroid Ultrasound Images (Pedraza et al., SPIE 2015), as site folders.

One patient per case (`xml/<case>.xml`). The case's marked images (`images/<case>_<k>.jpg`, 560x360 JPEG)
fill the contract's two view slots in image order; the orientation is not recorded in DDTI, so "trans" and
"long" only mean first and second image here. Each nodule mask is drawn from the case's outline polygons (their
union) with Pillow. There is no thyroid outline and no pixel spacing, so the location map and the capsule
distance are unknown (the thyroid mask columns stay empty) and the images are uncalibrated: nothing is
invented for either.

The label is TI-RADS 4a-5 (suspicious) against 2-3, a radiologist's score: an image task, not LLNM. A case
without TI-RADS is an unlabelled patient. Age and sex are written as clinical variables (sex `u` or empty is
missing); the radiologist's composition, echogenicity, margins and calcifications are not, because TI-RADS is
derived from them. The notes (`reporteco`) are too rarely filled to be reports, so the inputs declare none.

Not expressible, and counted: images beyond a case's second (the contract has two views), outlines whose JSON
is broken in the source (the view keeps its image but has no nodule mask, so it is marked missing in
training), unreadable XML files, images listed but absent.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from fl_research.importers.common import ImportResult, SitePatient, SourceError, copy_file
from shared_model.config.inputs import ClinicalVariable, InputsConfig
from shared_model.sitedata.contract import VIEWS

SUSPICIOUS = {"4a", "4b", "4c", "5"}
NOT_SUSPICIOUS = {"2", "3"}


def ddti_inputs() -> InputsConfig:
    return InputsConfig(
        images=True, reports=False,
        clinical=[
            ClinicalVariable(name="age", kind="numeric", description="age", unit="years", range=(0.0, 120.0),
                             center=45.0, scale=15.0),
            ClinicalVariable(name="sex", kind="categorical", levels=["F", "M"]),
        ],
        outcome="suspicious nodule: TI-RADS 4a-5 against 2-3 (DDTI radiologist score), not LLNM",
    )


def _polygons(svg: str) -> list[list[tuple[float, float]]]:
    """The outline polygons of one mark (each a list of (x, y) pixels); ValueError when the JSON is broken."""
    shapes = json.loads(svg)
    out = []
    for shape in shapes:
        points = [(float(p["x"]), float(p["y"])) for p in shape.get("points", [])]
        if len(points) >= 3:
            out.append(points)
    return out


def _mask_writer(image: Path, polygons: list[list[tuple[float, float]]]):
    def write(target: Path) -> None:
        from PIL import Image, ImageDraw

        with Image.open(image) as img:
            size = img.size  # (width, height)
        mask = Image.new("L", size, 0)
        draw = ImageDraw.Draw(mask)
        for polygon in polygons:
            draw.polygon(polygon, fill=255, outline=255)
        mask.save(target, format="PNG")
    return write


def read_ddti(source: Path) -> ImportResult:
    """Every case of the DDTI folder `source` (with `xml/` and `images/`) as a patient, or counted."""
    xml_dir, image_dir = source / "xml", source / "images"
    if not xml_dir.is_dir() or not image_dir.is_dir():
        raise SourceError(f"{source}: not a DDTI folder (expected xml/ and images/ inside it)")
    inputs = ddti_inputs()
    age_var, sex_var = inputs.clinical
    files = sorted(xml_dir.glob("*.xml"), key=lambda p: (len(p.stem), p.stem))
    result = ImportResult(
        dataset="ddti", source=source, inputs=inputs, patients=[], source_files=files,
        class_names=("TI-RADS 2-3", "TI-RADS 4a-5"),
        description="Simulated hospital from DDTI (Pedraza et al., SPIE 9287, 2015; research use only): "
                    "ultrasound images with nodule outlines; label TI-RADS 4a-5 vs 2-3, not LLNM",
    )
    for path in files:
        result.records_read += 1
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as exc:
            result.not_expressed[f"case XML unreadable ({type(exc).__name__})"] += 1
            continue
        case = (root.findtext("number") or path.stem).strip()
        tirads = (root.findtext("tirads") or "").strip().lower()
        label = 1 if tirads in SUSPICIOUS else 0 if tirads in NOT_SUSPICIOUS else None
        if label is None:
            result.notes["case without TI-RADS: unlabelled patient"] += 1
        patient_id = f"ddti-{case}"
        row: dict[str, str] = {"patient_id": patient_id, "llnm": "" if label is None else str(label)}
        age, _, _ = age_var.parse((root.findtext("age") or "").strip())
        row["age"] = "" if age is None else f"{age:g}"
        sex_text = (root.findtext("sex") or "").strip()
        sex, _, _ = sex_var.parse(sex_text if sex_text.upper() in ("F", "M") else "")
        row["sex"] = sex or ""
        if age is None:
            result.notes["age missing"] += 1
        if sex is None:
            result.notes[f"sex missing ({sex_text or 'empty'!s})"] += 1
        marks = []
        for mark in root.findall("mark"):
            index = (mark.findtext("image") or "").strip()
            image = image_dir / f"{case}_{index}.jpg"
            if not image.is_file():
                result.not_expressed[f"image listed in the XML but absent ({image.name})"] += 1
                continue
            marks.append((int(index) if index.isdigit() else 0, index, image, (mark.findtext("svg") or "").strip()))
        marks.sort()
        if len(marks) > len(VIEWS):
            result.not_expressed["image beyond a case's second (the contract has two views)"] += len(marks) - 2
        writers = {}
        for view, (_, index, image, svg) in zip(VIEWS, marks, strict=False):
            image_rel = f"images/{case}_{index}.jpg"
            row[f"{view}_image"] = image_rel
            writers[image_rel] = copy_file(image)
            try:
                polygons = _polygons(svg) if svg else []
            except (ValueError, KeyError, TypeError, AttributeError):
                result.not_expressed["nodule outline with broken JSON in the source (view left without mask)"] += 1
                continue
            if not polygons:
                result.notes["image without a nodule outline (view left without mask)"] += 1
                continue
            mask_rel = f"masks/{case}_{index}_nodule.png"
            row[f"{view}_nodule_mask"] = mask_rel
            writers[mask_rel] = _mask_writer(image, polygons)
        if not marks:
            result.notes["case without any image"] += 1
        result.patients.append(SitePatient(patient_id, row, label, case, writers))
    if not files:
        raise SourceError(f"{xml_dir}: no case XML files")
    return result
