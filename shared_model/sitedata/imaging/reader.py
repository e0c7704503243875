"""`read_image`: any ultrasound export (DICOM, PNG, JPEG), told apart by its first bytes, as one grey frame."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared_model.sitedata.imaging.common import (
    FrameSpec,
    ImageReadError,
    UltrasoundImage,
    _check_spacing,
    _describe,
    _frame_choice,
    _sniff,
)
from shared_model.sitedata.imaging.dicom import _read_dicom, _read_dicom_image
from shared_model.sitedata.imaging.pil import _read_pil_image


def read_image(
    path: str | Path,
    *,
    frame: FrameSpec = "middle",
    table_spacing_mm: Sequence[float] | None = None,
    region_hint: Sequence[float] | None = None,
) -> UltrasoundImage:
    """Read one ultrasound frame (DICOM, PNG or JPEG) as a grey image with its calibration.

    ``frame`` picks the cine frame: ``"first"``, ``"middle"`` (default, ``frames // 2``), ``"last"`` or a
    0-based index (an index outside the file is an :class:`ImageReadError`). ``table_spacing_mm`` is the site
    table's ``(row_mm, col_mm)``; it is used for PNG/JPEG and for DICOM files without a calibration of their
    own.
    ``region_hint`` is a ``(row, col)`` pixel (e.g. the nodule centroid) that selects among several 2-D
    ultrasound regions; without it the largest region is used.

    Raises :class:`ImageReadError` (message names the file) for anything wrong with the file, and
    :class:`ValueError` for a malformed ``frame`` or ``table_spacing_mm`` argument.
    """
    return _read_with_header(path, frame, table_spacing_mm, region_hint)[0]


def _read_with_header(
    path: str | Path,
    frame: FrameSpec,
    table_spacing_mm: Sequence[float] | None,
    region_hint: Sequence[float] | None,
) -> tuple[UltrasoundImage, Any]:
    """:func:`read_image` plus the DICOM dataset it came from (None for PNG/JPEG), read only once."""
    path = Path(path)
    table_spacing = _check_spacing(table_spacing_mm, path, "table_spacing_mm")
    _frame_choice(frame, path)
    kind = _sniff(path)
    if kind in ("png", "jpeg"):
        return _read_pil_image(path, kind, frame, table_spacing), None
    ds = _read_dicom(path)
    try:
        return _read_dicom_image(path, ds, frame, table_spacing, region_hint), ds
    except ImageReadError:
        raise
    except Exception as exc:
        # pydicom parses elements lazily, so a corrupt element surfaces at first access, wherever that is.
        raise ImageReadError(
            f"{path}: a DICOM element cannot be parsed ({_describe(exc)}); the file is corrupt"
        ) from exc
