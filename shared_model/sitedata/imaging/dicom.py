"""DICOM images: read the dataset, decode one frame with pydicom and reduce it to grey, with its calibration.

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
* Calibration: see :mod:`shared_model.sitedata.imaging.regions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.sitedata.imaging.common import (
    FrameSpec,
    ImageReadError,
    SpacingSource,
    UltrasoundImage,
    _describe,
    _luma,
    _resolve_frame,
)
from shared_model.sitedata.imaging.regions import _choose_region, _dicom_pixel_spacing, _parse_regions

# Photometric interpretations pydicom's decoders can hand back after their own colour conversion.
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


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
