"""Reading real ultrasound images and masks into one grey frame with a physical calibration.

Hospitals export ultrasound in many ways: DICOM from every vendor (native or compressed, colour or grey,
cine loops, palette images) and, at some sites, plain PNG/JPEG screenshots. The rest of llnm-fl only wants
one thing from a file: a 2-D grey frame plus the size of a pixel in millimetres, or an honest "unknown".
This module turns any of those exports into an :class:`UltrasoundImage` and fails with an
:class:`ImageReadError` that names the file and what is wrong, so that ``llnm-site check`` can report it.

Design choices (see also ``docs/site-data.md``):

* Decoding is pydicom's own pixel backend (with the pylibjpeg plugins). We ask the transfer syntax's
  decoder for one frame only (``Decoder.as_array(index=...)``) so a long cine loop is not decoded in full,
  and we read the photometric interpretation the decoder *returns*: pydicom already turns YBR_FULL,
  YBR_FULL_422 and the JPEG 2000 YBR_ICT/YBR_RCT components into RGB, so converting the file's declared
  colour space a second time would be wrong.
* Colour becomes grey with the ITU-R BT.601 luma weights (0.299 R + 0.587 G + 0.114 B), which is exactly
  the Y of YBR_FULL; PALETTE COLOR goes through :func:`pydicom.pixels.apply_color_lut` first (8/16-bit and
  segmented palettes). MONOCHROME images get their modality LUT (:func:`pydicom.pixels.apply_modality_lut`)
  and MONOCHROME1 is inverted so that bright always means echogenic. VOI windowing is a display setting and
  is not applied. Values stay in the source's own intensity scale, given as ``UltrasoundImage.value_range``.
* Calibration comes from the ultrasound region calibration when it exists (it is what the scanner
  measured), then ``PixelSpacing``, then the site table, else none: a distance is never guessed.
  ``ImagerPixelSpacing`` is deliberately *not* used: it is the detector-plane spacing of projection
  radiography, not part of the ultrasound image modules, so a value found there in an ultrasound export
  cannot be trusted as a tissue size.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared_model.config import parse_frame

FrameSpec = Literal["first", "middle", "last"] | int | str
SpacingSource = Literal["us_region", "pixel_spacing", "table", "none"]

#: ITU-R BT.601 luma weights (R, G, B): the same Y that YBR_FULL stores.
BT601_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
}
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
# Photometric interpretations pydicom's decoders can hand back after their own colour conversion.
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class ImageReadError(Exception):
    """An image or mask file cannot be used; the message always names the file and the reason."""


@dataclass
class UltrasoundImage:
    """One decoded ultrasound frame as a grey image, with where its calibration came from.

    ``pixels`` is float32 ``[rows, columns]`` in the source's intensity scale (``value_range``, e.g. 0..255
    for 8-bit data, 0..65535 for a 16-bit palette), so callers choose their own normalisation.
    ``spacing_mm`` is ``(row_mm, col_mm)``: the height and the width of one pixel, or ``None`` when the file
    and the table say nothing (``spacing_source == "none"``).
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    spacing_source: SpacingSource
    frames: int
    frame_index: int
    rows: int
    columns: int
    photometric: str
    transfer_syntax: str | None
    path: Path
    regions: list[dict[str, Any]] = field(default_factory=list)
    region_used: int | None = None
    value_range: tuple[float, float] = (0.0, 255.0)
    file_format: Literal["dicom", "png", "jpeg"] = "dicom"


# ----------------------------------------------------------------------------------------------------
# helpers shared by images and masks


def _sniff(path: Path) -> str:
    """Return "png", "jpeg" or "dicom" from the file's first bytes (extensions are not trusted)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image file") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot be opened ({exc.strerror or exc})") from exc
    if not head:
        raise ImageReadError(f"{path}: file is empty")
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    return "dicom"


def _read_dicom(path: Path) -> Any:
    """Read a DICOM dataset (pixel data included), or raise an ImageReadError that says why not.

    A file without the 128-byte preamble and ``DICM`` marker is still accepted when a forced read finds an
    image in it (old exports do this); anything else is reported as "neither DICOM nor PNG/JPEG".
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as exc:
        first_error: Exception = exc
    except Exception as exc:
        raise ImageReadError(f"{path}: unreadable or truncated DICOM file ({_describe(exc)})") from exc
    with path.open("rb") as fh:
        fh.seek(128)
        has_marker = fh.read(4) == b"DICM"
    if has_marker:
        raise ImageReadError(f"{path}: truncated or corrupt DICOM file ({_describe(first_error)})")
    try:
        ds = pydicom.dcmread(path, force=True)
        if "Rows" in ds and "Columns" in ds and "PixelData" in ds:
            return ds
    except Exception:
        pass
    raise ImageReadError(
        f"{path}: not a DICOM file (no 'DICM' marker and no readable DICOM image data), and not PNG or JPEG"
    )


def _missing_pixel_data_error(path: Path, ds: Any) -> ImageReadError:
    """Explain a dataset without PixelData: truncated inside the pixel data, or really not an image.

    pydicom stops quietly (with a warning) at an early end of file and drops the element it was reading, so
    a cut-off file looks like one without pixels. The Pixel Data tag's bytes still being in the file tell the
    two apart without touching global pydicom settings.
    """
    data = path.read_bytes()
    if b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data:
        return ImageReadError(
            f"{path}: truncated or corrupt DICOM file: its Pixel Data (7FE0,0010) element cannot be read to "
            f"the end ({len(data)} bytes in the file)"
        )
    other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
    detail = f"; it has {other[0]}, which ultrasound never uses" if other else ""
    sop = ds.get("SOPClassUID")
    kind = f" ({sop.name})" if sop is not None and hasattr(sop, "name") else ""
    return ImageReadError(
        f"{path}: DICOM file{kind} has no Pixel Data (7FE0,0010){detail} (not an image, or the file is "
        "truncated before its pixel data)"
    )


def _describe(exc: BaseException) -> str:
    """A short one-line description of a library exception for an error message."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _transfer_syntax(ds: Any, path: Path) -> Any:
    """The dataset's transfer syntax UID; for a forced read without file meta, the encoding it was read in."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    tsyntax = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if tsyntax:
        return UID(str(tsyntax))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        raise ImageReadError(f"{path}: DICOM file has no Transfer Syntax UID (0002,0010) in its file meta")
    syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if implicit:
        syntax = ImplicitVRLittleEndian
    if not hasattr(ds, "file_meta"):
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return syntax


def _number_of_frames(ds: Any) -> int:
    """NumberOfFrames, where absent, empty or 0 means a single frame (as pydicom itself treats it)."""
    try:
        value = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        value = 1
    return max(value, 1)


def _resolve_frame(frame: FrameSpec, frames: int, path: Path) -> int:
    """Turn a frame choice into a 0-based index.

    ``"first"`` is 0, ``"last"`` is ``frames - 1`` and ``"middle"`` is ``frames // 2`` (for an even count the
    later of the two central frames; for 65 frames, frame 32). An integer (or a string of digits, as given on
    the command line) is a 0-based index and must exist in the file: a wrong index is an error, never clamped.
    """
    if isinstance(frame, str) and frame.strip().startswith("-") and frame.strip()[1:].isdigit():
        frame = int(frame)
    if isinstance(frame, numbers.Integral) and not isinstance(frame, bool) and frame < 0:
        choice: str | int = int(frame)  # an index, just not one that exists
    else:
        try:
            choice = parse_frame(frame)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    if choice == "first":
        return 0
    if choice == "middle":
        return frames // 2
    if choice == "last":
        return frames - 1
    assert isinstance(choice, int)
    if not 0 <= choice < frames:
        raise ImageReadError(
            f"{path}: frame index {choice} is out of range: the file has {frames} frame(s) "
            f"(valid indices 0..{frames - 1})"
        )
    return choice


def _check_spacing(spacing: Sequence[float] | None, path: Path, what: str) -> tuple[float, float] | None:
    """Validate a (row_mm, col_mm) pair: both finite and > 0."""
    if spacing is None:
        return None
    try:
        row_mm, col_mm = (float(v) for v in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {what} must be two numbers (row_mm, col_mm), got {spacing!r}") from None
    if not (math.isfinite(row_mm) and math.isfinite(col_mm) and row_mm > 0 and col_mm > 0):
        raise ValueError(f"{path}: {what} must be two positive numbers (row_mm, col_mm), got {spacing!r}")
    return (row_mm, col_mm)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an ``[..., 3]`` array, as float32."""
    return rgb.astype(np.float32, copy=False) @ BT601_LUMA


# ----------------------------------------------------------------------------------------------------
# ultrasound region calibration


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


# ----------------------------------------------------------------------------------------------------
# DICOM pixels -> one grey frame


def _unsigned_range(bits: int) -> tuple[float, float]:
    return (0.0, float(2**bits - 1))


def _stored_range(ds: Any) -> tuple[float, float]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return (float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1))
    return _unsigned_range(bits)


def _grey_from_monochrome(
    arr: np.ndarray, ds: Any, photometric: str
) -> tuple[np.ndarray, tuple[float, float]]:
    """Apply the modality LUT (rescale or LUT sequence) and invert MONOCHROME1; return grey and its range."""
    from pydicom.pixels import apply_modality_lut

    lo, hi = _stored_range(ds)
    if "ModalityLUTSequence" in ds:
        item = ds.ModalityLUTSequence[0]
        out = apply_modality_lut(arr, ds)
        lut_bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        lo, hi = _unsigned_range(lut_bits)
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        out = apply_modality_lut(arr, ds)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    else:
        out = arr
    grey = np.asarray(out, dtype=np.float32)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 shows its minimum as white: mirror the scale so that high always means bright.
        grey = np.float32(lo + hi) - grey
    return grey, (lo, hi)


def _grey_from_palette(arr: np.ndarray, ds: Any, path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Map PALETTE COLOR indices through the (possibly segmented, 8- or 16-bit) palette, then take luma."""
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(arr, ds)
    except Exception as exc:
        raise ImageReadError(f"{path}: PALETTE COLOR lookup table unusable ({_describe(exc)})") from exc
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    lut_bits = int(descriptor[2]) if descriptor is not None and len(descriptor) == 3 else 8 * rgb.itemsize
    return _luma(rgb), _unsigned_range(lut_bits)


def _decode_dicom_frame(ds: Any, path: Path, index: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Decode one frame with pydicom's decoder for the transfer syntax and reduce it to grey."""
    from pydicom.pixels import as_pixel_options, get_decoder

    tsyntax = _transfer_syntax(ds, path)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageReadError(
            f"{path}: transfer syntax {tsyntax.name} ({tsyntax}) has no pixel data decoder in pydicom"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise ImageReadError(
            f"{path}: no decoder plugin available for transfer syntax {tsyntax.name} ({tsyntax}); "
            f"missing: {missing or 'unknown'}"
        )
    try:
        arr, meta = decoder.as_array(ds, index=index, **as_pixel_options(ds))
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(
            f"{path}: pixel data cannot be decoded (transfer syntax {tsyntax.name}, frame {index}): "
            f"{_describe(exc)}; the file may be truncated or corrupt"
        ) from exc

    # The decoder reports the colour space of what it returns (YBR_* and ICT/RCT already became RGB).
    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    samples = int(meta.get("samples_per_pixel", ds.get("SamplesPerPixel", 1)) or 1)
    if photometric in _MONOCHROME and samples == 1:
        return _grey_from_monochrome(arr, ds, photometric)
    if photometric == "PALETTE COLOR" and samples == 1:
        return _grey_from_palette(arr, ds, path)
    bits = int(meta.get("bits_stored", ds.get("BitsStored", 8)) or 8)
    if photometric == "RGB" and samples == 3:
        return _luma(arr), _unsigned_range(bits)
    if photometric in ("YBR_FULL", "YBR_FULL_422") and samples == 3:
        # Only reached if a decoder left YCbCr untouched: Y *is* the BT.601 luma, no round trip through RGB.
        return arr[..., 0].astype(np.float32), _unsigned_range(bits)
    raise ImageReadError(
        f"{path}: unsupported photometric interpretation {photometric!r} with {samples} sample(s) per pixel "
        "(supported: MONOCHROME1/2, RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT, PALETTE COLOR)"
    )


def _read_dicom_image(
    path: Path,
    ds: Any,
    frame: FrameSpec,
    table_spacing: tuple[float, float] | None,
    region_hint: Sequence[float] | None,
) -> UltrasoundImage:
    if "PixelData" not in ds:
        raise _missing_pixel_data_error(path, ds)
    for keyword in ("Rows", "Columns", "PhotometricInterpretation", "BitsAllocated"):
        if ds.get(keyword) in (None, ""):
            raise ImageReadError(f"{path}: DICOM image is missing the required attribute {keyword}")
    frames = _number_of_frames(ds)
    index = _resolve_frame(frame, frames, path)
    grey, value_range = _decode_dicom_frame(ds, path, index)
    if grey.ndim != 2:
        raise ImageReadError(f"{path}: decoded frame has unexpected shape {grey.shape}")

    regions = _parse_regions(ds)
    region_used = _choose_region(regions, region_hint)
    spacing: tuple[float, float] | None
    source: SpacingSource
    if region_used is not None:
        chosen = regions[region_used]
        spacing, source = (chosen["row_mm"], chosen["col_mm"]), "us_region"
    elif (pixel_spacing := _dicom_pixel_spacing(ds)) is not None:
        spacing, source = pixel_spacing, "pixel_spacing"
    elif table_spacing is not None:
        spacing, source = table_spacing, "table"
    else:
        spacing, source = None, "none"

    tsyntax = ds.file_meta.TransferSyntaxUID
    return UltrasoundImage(
        pixels=np.ascontiguousarray(grey, dtype=np.float32),
        spacing_mm=spacing,
        spacing_source=source,
        frames=frames,
        frame_index=index,
        rows=int(grey.shape[0]),
        columns=int(grey.shape[1]),
        photometric=str(ds.PhotometricInterpretation),
        transfer_syntax=str(tsyntax.name),
        path=path,
        regions=regions,
        region_used=region_used,
        value_range=value_range,
        file_format="dicom",
    )


# ----------------------------------------------------------------------------------------------------
# PNG / JPEG


def _open_pil(path: Path, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: unreadable or truncated {what} ({_describe(exc)})") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: {what} is implausibly large ({_describe(exc)})") from exc
    return img


_PIL_PHOTOMETRIC = {
    "1": "MONOCHROME2",
    "L": "MONOCHROME2",
    "LA": "MONOCHROME2",
    "I": "MONOCHROME2",
    "F": "MONOCHROME2",
    "P": "PALETTE COLOR",
    "PA": "PALETTE COLOR",
    "RGB": "RGB",
    "RGBA": "RGB",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "YBR_FULL",
}


def _pil_to_grey(img: Any, path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Grey float32 frame of a PIL image (alpha dropped, colour -> BT.601 luma) and its nominal range."""
    mode = img.mode
    if mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float32), (0.0, 65535.0)
    if mode in ("1",):
        return np.asarray(img, dtype=np.float32), (0.0, 1.0)
    if mode in ("L", "LA"):
        return np.asarray(img.getchannel("L"), dtype=np.float32), (0.0, 255.0)
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return arr, (0.0, 65535.0)
        return arr, (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if mode in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"):
        rgb = np.asarray(img.convert("RGB"))
        return _luma(rgb), (0.0, 255.0)
    raise ImageReadError(f"{path}: unsupported PNG/JPEG pixel mode {mode!r}")


def _read_pil_image(
    path: Path, kind: str, frame: FrameSpec, table_spacing: tuple[float, float] | None
) -> UltrasoundImage:
    img = _open_pil(path, kind.upper())
    frames = int(getattr(img, "n_frames", 1) or 1)
    index = _resolve_frame(frame, frames, path)
    if index:
        try:
            img.seek(index)
            img.load()
        except (EOFError, OSError) as exc:
            raise ImageReadError(f"{path}: frame {index} cannot be read ({_describe(exc)})") from exc
    grey, value_range = _pil_to_grey(img, path)
    photometric = _PIL_PHOTOMETRIC.get(img.mode.split(";")[0], img.mode)
    return UltrasoundImage(
        pixels=np.ascontiguousarray(grey, dtype=np.float32),
        spacing_mm=table_spacing,
        spacing_source="table" if table_spacing is not None else "none",
        frames=frames,
        frame_index=index,
        rows=int(grey.shape[0]),
        columns=int(grey.shape[1]),
        photometric=photometric,
        transfer_syntax=None,
        path=path,
        regions=[],
        region_used=None,
        value_range=value_range,
        file_format="png" if kind == "png" else "jpeg",
    )


# ----------------------------------------------------------------------------------------------------
# public API


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


def _read_with_header(
    path: str | Path,
    frame: FrameSpec,
    table_spacing_mm: Sequence[float] | None,
    region_hint: Sequence[float] | None,
) -> tuple[UltrasoundImage, Any]:
    """:func:`read_image` plus the DICOM dataset it came from (None for PNG/JPEG), read only once."""
    path = Path(path)
    table_spacing = _check_spacing(table_spacing_mm, path, "table_spacing_mm")
    kind = _sniff(path)
    if kind in ("png", "jpeg"):
        return _read_pil_image(path, kind, frame, table_spacing), None
    ds = _read_dicom(path)
    return _read_dicom_image(path, ds, frame, table_spacing, region_hint), ds


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


def inspect_file(path: str | Path, frame: FrameSpec = "middle") -> dict[str, Any]:
    """Describe an image file as a JSON-able dict, decoding the chosen frame (so a corrupt file fails).

    Used by ``llnm-site inspect`` so an operator can see what llnm-fl makes of a file: geometry, colour,
    compression, calibration and its source, every ultrasound region, and statistics of the grey frame.
    """
    path = Path(path)
    image, ds = _read_with_header(path, frame, None, None)
    info: dict[str, Any] = {
        "path": str(path),
        "file_format": image.file_format,
        "modality": None,
        "manufacturer": None,
        "sop_class": None,
        "frames": image.frames,
        "frame_index": image.frame_index,
        "rows": image.rows,
        "columns": image.columns,
        "photometric": image.photometric,
        "transfer_syntax": image.transfer_syntax,
        "bits_allocated": None,
        "bits_stored": None,
        "samples_per_pixel": None,
        "planar_configuration": None,
        "spacing_mm": list(image.spacing_mm) if image.spacing_mm is not None else None,
        "spacing_source": image.spacing_source,
        "regions": image.regions,
        "region_used": image.region_used,
        "value_range": list(image.value_range),
    }
    if ds is not None:
        sop = ds.get("SOPClassUID")
        planar = ds.get("PlanarConfiguration")
        info.update(
            modality=str(ds.get("Modality")) if ds.get("Modality") else None,
            manufacturer=str(ds.get("Manufacturer")) if ds.get("Manufacturer") else None,
            sop_class=(getattr(sop, "name", None) or str(sop)) if sop else None,
            bits_allocated=int(ds.BitsAllocated),
            bits_stored=int(ds.get("BitsStored") or ds.BitsAllocated),
            samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
            planar_configuration=int(planar) if planar not in (None, "") else None,
        )
    else:
        from PIL import Image

        with Image.open(path) as img:
            mode = img.mode
            info.update(
                bits_allocated=16
                if mode.startswith("I;16")
                else 32
                if mode in ("I", "F")
                else 1
                if mode == "1"
                else 8,
                samples_per_pixel=len(img.getbands()),
                pil_mode=mode,
            )
    pixels = image.pixels
    info["pixel_stats"] = {
        "min": float(pixels.min()),
        "max": float(pixels.max()),
        "mean": float(pixels.mean()),
        "std": float(pixels.std()),
    }
    return info
