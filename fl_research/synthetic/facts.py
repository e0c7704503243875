"""What a synthetic report is written from: the radiologist's knowledge of the patient (`ReportFacts`), shared by
the site dialects (`dialects`) and the report writer (`reports`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReportFacts"]


@dataclass(frozen=True)
class ReportFacts:
    """What the radiologist knows about the patient (the truth), plus nuisance details."""

    lobe: str
    third: str
    width_mm: float
    depth_mm: float
    length_mm: float
    size_mm: float
    composition: str
    echogenicity: str
    margin: str
    microcalcifications: bool
    taller_than_wide: bool
    node_finding: bool
    diffuse_disease: bool
    study_date: str  # YYYYMMDD
