"""Masks: PNG (any mode; non-zero is inside) and DICOM SEG (binary, fractional, label map) as boolean arrays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.sitedata.imaging.common import ImageReadError, _describe, _sniff
from shared_model.sitedata.imaging.dicom import _missing_pixel_data_error, _read_dicom, _transfer_syntax
from shared_model.sitedata.imaging.pil import _open_pil

_SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
}


def _seg_frame_refs(ds: Any, nframes: int) -> tuple[list[int | None], list[int | None]]:
    """Per SEG frame: the referenced segment number and the referenced source frame number (1-based)."""
    segments: list[int | None] = [None] * nframes
    source_frames: list[int | None] = [None] * nframes
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None) or []
    for i, item in enumerate(per_frame[:nframes]):
        ident = item.get("SegmentIdentificationSequence", None) or []
        if ident and ident[0].get("ReferencedSegmentNumber") is not None:
            segments[i] = int(ident[0].ReferencedSegmentNumber)
        for derivation in item.get("DerivationImageSequence", None) or []:
            for source in derivation.get("SourceImageSequence", None) or []:
                ref = source.get("ReferencedFrameNumber")
                if ref not in (None, ""):
                    source_frames[i] = int(
                        ref[0] if isinstance(ref, Sequence) and not isinstance(ref, str) else ref
                    )
    return segments, source_frames


def _read_seg_mask(path: Path, ds: Any, frame_index: int | None, segment_number: int | None) -> np.ndarray:
    """Union of a DICOM SEG's frames (optionally of one segment / one source frame) as a boolean mask.

    BINARY segmentations are used as they are. FRACTIONAL ones are inside where the value is at least half of
    MaximumFractionalValue (probability or occupancy >= 0.5). LABELMAP ones are inside where the label is
    non-zero (or equals ``segment_number``).
    """
    sop = str(ds.get("SOPClassUID", ""))
    if sop not in _SEG_SOP_CLASSES and ds.get("Modality") != "SEG":
        name = getattr(ds.get("SOPClassUID"), "name", sop) or "unknown SOP class"
        raise ImageReadError(
            f"{path}: DICOM file is {name}, not Segmentation (SEG); masks must be PNG or DICOM SEG"
        )
    if "PixelData" not in ds:
        raise _missing_pixel_data_error(path, ds)
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    if seg_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise ImageReadError(
            f"{path}: unsupported SegmentationType {seg_type!r} (BINARY, FRACTIONAL, LABELMAP)"
        )
    from pydicom.pixels import as_pixel_options, get_decoder

    tsyntax = _transfer_syntax(ds, path)
    try:
        decoder = get_decoder(tsyntax)
        arr, _ = decoder.as_array(ds, **as_pixel_options(ds))
    except NotImplementedError:
        raise ImageReadError(f"{path}: transfer syntax {tsyntax.name} has no pixel data decoder") from None
    except Exception as exc:
        raise ImageReadError(f"{path}: DICOM SEG pixel data cannot be decoded ({_describe(exc)})") from exc
    rows, cols = int(ds.Rows), int(ds.Columns)
    arr = arr.reshape(-1, rows, cols)
    segments, source_frames = _seg_frame_refs(ds, arr.shape[0])
    keep = np.ones(arr.shape[0], dtype=bool)
    if segment_number is not None and seg_type != "LABELMAP":
        keep &= np.array([s == segment_number for s in segments], dtype=bool)
        if not keep.any():
            present = sorted({s for s in segments if s is not None})
            raise ImageReadError(
                f"{path}: DICOM SEG has no frame for segment {segment_number} (has {present})"
            )
    if frame_index is not None:
        # Frames that name another source frame belong to that frame; frames naming none apply to the image.
        keep &= np.array([f is None or f == frame_index + 1 for f in source_frames], dtype=bool)
    selected = arr[keep]
    if seg_type == "FRACTIONAL":
        max_value = float(ds.get("MaximumFractionalValue") or 255)
        inside = selected.astype(np.float32) >= max_value / 2.0
    elif seg_type == "LABELMAP" and segment_number is not None:
        inside = selected == segment_number
    else:
        inside = selected != 0
    return inside.any(axis=0) if inside.shape[0] else np.zeros((rows, cols), dtype=bool)


def _read_png_mask(path: Path) -> np.ndarray:
    """Non-zero (in any colour channel; alpha ignored) is inside. Palette PNGs are judged by their colours."""
    img = _open_pil(path, "PNG mask")
    mode = img.mode
    if mode in ("P", "PA"):
        arr = np.asarray(img.convert("RGB"))
    elif mode in ("LA", "RGBA"):
        arr = np.asarray(img)[..., :-1]
    elif mode in ("RGBX", "CMYK", "YCbCr"):
        arr = np.asarray(img.convert("RGB"))
    else:
        arr = np.asarray(img)
    return arr.any(axis=-1) if arr.ndim == 3 else arr != 0


def read_mask(
    path: str | Path,
    expected_shape: tuple[int, int] | None = None,
    *,
    frame_index: int | None = None,
    segment_number: int | None = None,
) -> np.ndarray:
    """Read a binary mask (PNG or DICOM SEG) as a boolean ``[rows, columns]`` array; True is inside.

    PNG: any bit depth or mode; a pixel is inside when any colour channel is non-zero (alpha is ignored).
    DICOM SEG: the union of its frames (so several segments or frames collapse into one mask for the
    single-frame image); ``segment_number`` keeps one segment, and ``frame_index`` (0-based, the image's
    frame) keeps only SEG frames derived from that source frame. JPEG masks are refused: lossy compression
    turns background into small non-zero values.

    An empty mask is returned as such; whether emptiness is acceptable is the site checker's decision.
    ``expected_shape`` ``(rows, columns)`` is the image's size; a different mask size is an
    :class:`ImageReadError` naming both sizes.
    """
    path = Path(path)
    kind = _sniff(path)
    if kind == "jpeg":
        raise ImageReadError(f"{path}: JPEG is not accepted for masks (lossy); use PNG or DICOM SEG")
    if kind == "png":
        mask = _read_png_mask(path)
    else:
        mask = _read_seg_mask(path, _read_dicom(path), frame_index, segment_number)
    mask = np.ascontiguousarray(mask, dtype=bool)
    if expected_shape is not None:
        want = (int(expected_shape[0]), int(expected_shape[1]))
        if tuple(mask.shape) != want:
            raise ImageReadError(
                f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} (rows x columns) but its image is "
                f"{want[0]}x{want[1]}"
            )
    return mask
