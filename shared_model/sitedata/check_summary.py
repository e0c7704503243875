"""The summary of `llnm-site check` (`shared_model.sitedata.check`): what a site holds, as JSON and as text.

`summarise` counts patients, labels per split, risk stages, the declared inputs and every clinical variable's
values, and for the modalities the inputs use, the files listed, decoded and missing; `format_lines` writes
the text report (summary tables, then one line per problem).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared_model.config.inputs import ClinicalVariable
from shared_model.sitedata.contract import PATIENTS_FILE, SPLITS, VIEWS, PatientRecord, Problem, Site
from shared_model.text_table import format_table

if TYPE_CHECKING:  # pragma: no cover - typing only
    from shared_model.sitedata.imaging import FrameSpec, UltrasoundImage

MASK_KINDS: tuple[str, ...] = ("nodule_mask", "thyroid_mask")
SPACING_SOURCES: tuple[str, ...] = ("us_region", "pixel_spacing", "table", "none")


@dataclass
class FileFacts:
    """What decoding one patient's files found; merged into the summary after all patients are done."""

    problems: list[Problem] = field(default_factory=list)
    report_ok: bool = False
    images: dict[str, UltrasoundImage | None] = field(
        default_factory=dict
    )  # view -> decoded image (pixels dropped)
    masks_ok: dict[str, bool] = field(default_factory=dict)  # "<view>_<kind>" -> decoded and valid


@dataclass
class CheckReport:
    """Everything `llnm-site check` found: a summary of the site and every problem, in table order."""

    site: str
    root: Path
    deep: bool
    summary: dict[str, Any]
    problems: list[Problem]

    @property
    def usable(self) -> bool:
        return not any(p.level == "error" for p in self.problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    def to_dict(self) -> dict[str, Any]:
        """The `--json` object of docs/site-data.md."""
        return {
            "site": self.site,
            "root": str(self.root),
            "usable": self.usable,
            "deep": self.deep,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "summary": self.summary,
            "problems": [p.to_dict() for p in self.problems],
        }

    def format_text(self) -> str:
        """Plain text (summary tables, then one line per problem) that reads well in a log or a pipe."""
        return "\n".join(format_lines(self))



def _label_counts(patients: list[PatientRecord]) -> dict[str, Any]:
    positive = sum(p.llnm == 1 for p in patients)
    negative = sum(p.llnm == 0 for p in patients)
    labelled = positive + negative
    return {
        "patients": len(patients),
        "labelled": labelled,
        "positive": positive,
        "negative": negative,
        "unlabelled": len(patients) - labelled,
        "prevalence": round(positive / labelled, 4) if labelled else None,
    }


def _variable_summary(var: ClinicalVariable, patients: list[PatientRecord]) -> dict[str, Any]:
    """A clinical variable's kind, how many patients miss it, and its levels' counts or its range."""
    values = [p.clinical.get(var.name) for p in patients]
    known = [v for v in values if v is not None]
    out: dict[str, Any] = {"kind": var.kind, "missing": len(values) - len(known)}
    if var.kind == "categorical":
        counts = Counter(known)
        out["levels"] = {level: counts.get(level, 0) for level in var.levels or []}
    else:
        numbers = [float(v) for v in known]
        out["unit"] = var.unit
        out.update({"min": min(numbers), "median": statistics.median(numbers), "max": max(numbers)}
                   if numbers else {"min": None, "median": None, "max": None})
    return out


def summarise(site: Site, facts: list[FileFacts] | None, frame: FrameSpec) -> dict[str, Any]:
    patients = site.patients
    deep = facts is not None
    summary: dict[str, Any] = {
        "rows": site.rows,
        "patients": len(patients),
        "rows_left_out": site.rows - len(patients),
        "deep": deep,
        "frame": frame,
        "labels": _label_counts(patients),
        "splits": {split: _label_counts([p for p in patients if p.split == split]) for split in SPLITS},
        "risk_stage": {
            **{str(s): sum(p.risk_stage == s for p in patients) for s in (1, 2, 3)},
            "unknown_for_positive": sum(p.llnm == 1 and p.risk_stage is None for p in patients),
        },
    }

    inputs = site.inputs
    summary["inputs"] = {
        "images": inputs.images,
        "reports": inputs.reports,
        "outcome": inputs.outcome,
        "declared_in_site_yaml": site.declared_inputs is not None,
        "clinical": {var.name: _variable_summary(var, patients) for var in inputs.clinical},
    }
    if site.provenance is not None:
        summary["import"] = site.provenance

    listed_report = sum(p.report is not None for p in patients)
    summary["reports"] = {
        "listed": listed_report,
        "readable": sum(f.report_ok for f in facts) if deep else None,
    }
    images: dict[str, dict[str, int | None]] = {}
    masks: dict[str, dict[str, int | None]] = {}
    for view in VIEWS:
        images[view] = {
            "listed": sum(p.views[view].image is not None for p in patients),
            "readable": sum(f.images.get(view) is not None for f in facts) if deep else None,
        }
        for kind in MASK_KINDS:
            column = f"{view}_{kind}"
            masks[column] = {
                "listed": sum(getattr(p.views[view], kind) is not None for p in patients),
                "readable": sum(f.masks_ok.get(column, False) for f in facts) if deep else None,
            }
    summary["images"] = images
    summary["masks"] = masks

    missing: dict[str, int] = {"report": len(patients) - listed_report}
    for view in VIEWS:
        missing[f"{view}_image"] = sum(p.views[view].image is None for p in patients)
        for kind in MASK_KINDS:
            missing[f"{view}_{kind}"] = sum(getattr(p.views[view], kind) is None for p in patients)
    missing["both_views"] = sum(all(p.views[v].image is None for v in VIEWS) for p in patients)
    summary["missing"] = missing

    if deep:
        decoded = [img for f in facts for img in f.images.values() if img is not None]
        sizes = Counter((img.rows, img.columns) for img in decoded)
        summary["image_sizes"] = [{"rows": r, "columns": c, "count": n} for (r, c), n in sizes.most_common()]
        sources = Counter(img.spacing_source for img in decoded)
        summary["spacing_sources"] = {s: sources.get(s, 0) for s in SPACING_SOURCES}
        spacing: dict[str, dict[str, float | int]] = {}
        for source in SPACING_SOURCES:
            values = [
                v
                for img in decoded
                if img.spacing_source == source and img.spacing_mm
                for v in img.spacing_mm
            ]
            if values:
                spacing[source] = {
                    "images": sources[source],
                    "min": round(min(values), 6),
                    "median": round(statistics.median(values), 6),
                    "max": round(max(values), 6),
                }
        summary["spacing_mm"] = spacing
        summary["file_formats"] = dict(Counter(img.file_format for img in decoded).most_common())
        summary["photometric"] = dict(Counter(img.photometric for img in decoded).most_common())
        summary["transfer_syntax"] = dict(
            Counter(img.transfer_syntax for img in decoded if img.transfer_syntax is not None).most_common()
        )
        summary["multi_frame"] = sum(img.frames > 1 for img in decoded)
    return summary


# -------------------------------------------------------------------------------------------------- text form


def format_lines(report: CheckReport) -> Iterator[str]:
    s = report.summary
    errors, warnings = len(report.errors), len(report.warnings)
    verdict = "USABLE" if report.usable else "NOT USABLE"
    yield f"Site {report.site} ({report.root})"
    yield (
        f"{verdict}: {errors} error(s), {warnings} warning(s)"
        + ("" if report.deep else "  [--quick: table only, no file decoded]")
    )
    yield ""
    yield (
        f"{PATIENTS_FILE}: {s['rows']} patient rows, {s['patients']} loaded, "
        f"{s['rows_left_out']} left out because of errors"
    )
    yield ""
    label_rows = []
    for name, counts in [*s["splits"].items(), ("all", s["labels"])]:
        prevalence = "-" if counts["prevalence"] is None else f"{counts['prevalence']:.1%}"
        label_rows.append(
            [
                name,
                counts["patients"],
                counts["labelled"],
                counts["positive"],
                counts["negative"],
                counts["unlabelled"],
                prevalence,
            ]
        )
    yield from format_table(
        ["split", "patients", "labelled", "LLNM+", "LLNM-", "unlabelled", "prevalence"], label_rows
    )
    stage = s["risk_stage"]
    yield (
        f"risk stage (LLNM+): 1: {stage['1']}, 2: {stage['2']}, 3: {stage['3']}, "
        f"unknown: {stage['unknown_for_positive']}"
    )
    yield ""

    inputs = s["inputs"]
    source = "site.yaml" if inputs["declared_in_site_yaml"] else "defaults: site.yaml declares none"
    absent = [m for m in ("images", "reports") if not inputs[m]]
    yield (f"inputs ({source}): images {'yes' if inputs['images'] else 'no'}, reports "
           f"{'yes' if inputs['reports'] else 'no'}, {len(inputs['clinical'])} clinical variable(s); "
           f"outcome (column llnm): {inputs['outcome']}")
    if "import" in s:
        yield "imported: " + ", ".join(f"{k} {v}" for k, v in s["import"].items() if not isinstance(v, dict | list))
    clinical_rows = []
    for name, entry in inputs["clinical"].items():
        if entry["kind"] == "categorical":
            values = ", ".join(f"{level} {n}" for level, n in entry["levels"].items())
        elif entry["min"] is None:
            values = "-"
        else:
            unit = f" {entry['unit']}" if entry["unit"] else ""
            values = f"{entry['min']:g}-{entry['max']:g}{unit} (median {entry['median']:g})"
        clinical_rows.append([name, entry["kind"], entry["missing"], values])
    if clinical_rows:
        yield from format_table(["clinical variable", "kind", "missing", "values"], clinical_rows)
    yield ""

    def readable(entry: dict[str, int | None]) -> str:
        return "-" if entry["readable"] is None else str(entry["readable"])

    if "images" in absent and "reports" in absent:
        yield "no files: the inputs declare neither images nor reports"
        file_rows: list[list[Any]] = []
    else:
        file_rows = ([["report", s["reports"]["listed"], readable(s["reports"]), s["missing"]["report"]]]
                     if "reports" not in absent else [])
    for view in VIEWS if "images" not in absent else ():
        file_rows.append(
            [
                f"{view} image",
                s["images"][view]["listed"],
                readable(s["images"][view]),
                s["missing"][f"{view}_image"],
            ]
        )
        for kind in MASK_KINDS:
            column = f"{view}_{kind}"
            file_rows.append(
                [
                    f"{view} {kind.replace('_', ' ')}",
                    s["masks"][column]["listed"],
                    readable(s["masks"][column]),
                    s["missing"][column],
                ]
            )
    if file_rows:
        yield from format_table(["file", "listed", "readable", "missing"], file_rows)
    if "images" not in absent:
        yield f"patients with neither view: {s['missing']['both_views']}"

    if report.deep and "images" not in absent:
        yield ""
        sizes = ", ".join(f"{e['rows']}x{e['columns']} ({e['count']})" for e in s["image_sizes"]) or "-"
        yield f"image sizes (rows x columns): {sizes}"
        sources = ", ".join(f"{k} {v}" for k, v in s["spacing_sources"].items() if v) or "-"
        yield f"calibration sources: {sources}"
        for source, st in s["spacing_mm"].items():
            yield (
                f"  pixel size from {source}: min {st['min']:.4g} mm, median {st['median']:.4g} mm, "
                f"max {st['max']:.4g} mm ({st['images']} image(s))"
            )
        yield "file formats: " + (", ".join(f"{k} {v}" for k, v in s["file_formats"].items()) or "-")
        yield "photometric: " + (", ".join(f"{k} {v}" for k, v in s["photometric"].items()) or "-")
        yield "transfer syntaxes: " + (", ".join(f"{k} {v}" for k, v in s["transfer_syntax"].items()) or "-")
        yield f"multi-frame (cine) images: {s['multi_frame']} (frame used: {s['frame']})"

    yield ""
    if report.problems:
        yield f"Problems ({errors} error(s), {warnings} warning(s)):"
        for problem in report.problems:
            yield problem.format()
    else:
        yield "No problems found."
