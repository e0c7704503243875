"""`inspect_file`: what llnm-fl makes of one image file, for ``llnm-site inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared_model.sitedata.imaging.common import FrameSpec
from shared_model.sitedata.imaging.reader import _read_with_header


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
