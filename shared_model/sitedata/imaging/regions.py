"""DICOM calibration: the ultrasound regions (SequenceOfUltrasoundRegions) and PixelSpacing.

Calibration comes from the ultrasound region calibration when it exists (it is what the scanner measured),
then ``PixelSpacing``, then the site table, else none: a distance is never guessed. ``ImagerPixelSpacing`` is
deliberately *not* used: it is the detector-plane spacing of projection radiography, not part of the
ultrasound image modules, so a value found there in an ultrasound export cannot be trusted as a tissue size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from shared_model.sitedata.imaging.common import UltrasoundImage

# PhysicalUnitsX/YDirection (0018,6024/6026) code for centimetres; the only length unit the standard defines.
_UNITS_CM = 3
_UNIT_NAMES = {
    0: "none",
    1: "percent",
    2: "dB",
    3: "cm",
    4: "seconds",
    5: "hertz",
    6: "dB/seconds",
    7: "cm/sec",
    8: "cm2",
    9: "cm2/sec",
    10: "cm3",
    11: "cm3/sec",
    12: "degrees",
}
# RegionSpatialFormat (0018,6012): 1 is a 2-D tissue image; the others cannot calibrate a B-mode frame.
_SPATIAL_FORMAT_NAMES = {
    0: "none",
    1: "2D",
    2: "M-mode",
    3: "spectral",
    4: "wave form",
    5: "graphics",
}


def _parse_regions(ds: Any) -> list[dict[str, Any]]:
    """Describe every item of SequenceOfUltrasoundRegions as a JSON-able dict.

    ``row_mm``/``col_mm`` are filled (absolute value, cm -> mm) only when the region can calibrate a B-mode
    frame: spatial format 1 (2-D tissue) with both axes in centimetres and non-zero, finite deltas. ``usable``
    says so, and ``reason`` says why not otherwise (Doppler, non-spatial, time axis, ...).
    """
    regions: list[dict[str, Any]] = []
    for index, item in enumerate(ds.get("SequenceOfUltrasoundRegions", None) or []):

        def _int(keyword: str, _item: Any = item) -> int | None:
            value = _item.get(keyword)
            return None if value is None or value == "" else int(value)

        def _float(keyword: str, _item: Any = item) -> float | None:
            value = _item.get(keyword)
            return None if value is None or value == "" else float(value)

        fmt = _int("RegionSpatialFormat")
        units_x, units_y = _int("PhysicalUnitsXDirection"), _int("PhysicalUnitsYDirection")
        delta_x, delta_y = _float("PhysicalDeltaX"), _float("PhysicalDeltaY")
        region: dict[str, Any] = {
            "index": index,
            "spatial_format": fmt,
            "spatial_format_name": _SPATIAL_FORMAT_NAMES.get(fmt, "other") if fmt is not None else None,
            "data_type": _int("RegionDataType"),
            "flags": _int("RegionFlags"),
            "min_col": _int("RegionLocationMinX0"),
            "min_row": _int("RegionLocationMinY0"),
            "max_col": _int("RegionLocationMaxX1"),
            "max_row": _int("RegionLocationMaxY1"),
            "units_x": units_x,
            "units_y": units_y,
            "units_x_name": _UNIT_NAMES.get(units_x, "other") if units_x is not None else None,
            "units_y_name": _UNIT_NAMES.get(units_y, "other") if units_y is not None else None,
            "physical_delta_x": delta_x,
            "physical_delta_y": delta_y,
            "row_mm": None,
            "col_mm": None,
            "usable": False,
            "reason": "",
        }
        bounds = [region[k] for k in ("min_col", "min_row", "max_col", "max_row")]
        if fmt != 1:
            region["reason"] = (
                f"spatial format {fmt} ({region['spatial_format_name']}) is not a 2-D tissue region"
            )
        elif units_x != _UNITS_CM or units_y != _UNITS_CM:
            region["reason"] = (
                f"physical units {region['units_x_name']} x {region['units_y_name']} are not cm x cm"
            )
        elif delta_x is None or delta_y is None or not (math.isfinite(delta_x) and math.isfinite(delta_y)):
            region["reason"] = "PhysicalDeltaX/Y missing or not finite"
        elif delta_x == 0 or delta_y == 0:
            region["reason"] = "PhysicalDeltaX/Y is zero"
        elif any(b is None for b in bounds):
            region["reason"] = "region location (RegionLocationMin/Max) missing"
        else:
            region["row_mm"] = abs(delta_y) * 10.0
            region["col_mm"] = abs(delta_x) * 10.0
            region["usable"] = True
        regions.append(region)
    return regions


def _choose_region(regions: list[dict[str, Any]], region_hint: Sequence[float] | None) -> int | None:
    """Pick the calibrating region: the usable one containing ``region_hint`` (row, col), else the largest.

    Ties in area go to the first region in file order. Returns None when no region is usable.
    """
    usable = [r for r in regions if r["usable"]]
    if not usable:
        return None
    if region_hint is not None:
        row, col = (float(v) for v in region_hint)
        for r in usable:
            if r["min_row"] <= row <= r["max_row"] and r["min_col"] <= col <= r["max_col"]:
                return int(r["index"])

    def area(r: dict[str, Any]) -> int:
        return (r["max_row"] - r["min_row"] + 1) * (r["max_col"] - r["min_col"] + 1)

    best = max(usable, key=lambda r: (area(r), -r["index"]))
    return int(best["index"])


def _dicom_pixel_spacing(ds: Any) -> tuple[float, float] | None:
    """``PixelSpacing`` (row, col), or that of the shared functional groups of an enhanced multi-frame."""
    candidates = [ds.get("PixelSpacing")]
    for shared in ds.get("SharedFunctionalGroupsSequence", None) or []:
        for measures in shared.get("PixelMeasuresSequence", None) or []:
            candidates.append(measures.get("PixelSpacing"))
    for value in candidates:
        if value is None:
            continue
        try:
            row_mm, col_mm = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(row_mm) and math.isfinite(col_mm) and row_mm > 0 and col_mm > 0:
            return (row_mm, col_mm)
    return None


def select_region(image: UltrasoundImage, region_hint: Sequence[float]) -> UltrasoundImage:
    """Re-choose the calibrating ultrasound region for a ``(row, col)`` point without decoding again.

    The nodule mask is only known after the image was read; with several 2-D regions (e.g. a dual-pane
    ALOKA screen) its centroid picks the region, as ``read_image(..., region_hint=...)`` would. Images
    calibrated by PixelSpacing, the table or not at all are returned unchanged.
    """
    if image.spacing_source != "us_region":
        return image
    index = _choose_region(image.regions, region_hint)
    if index is None or index == image.region_used:
        return image
    chosen = image.regions[index]
    return replace(image, spacing_mm=(chosen["row_mm"], chosen["col_mm"]), region_used=index)
