"""PNG and JPEG images (screenshots some sites export): one grey frame, calibrated only by the site table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared_model.sitedata.imaging.common import (
    FrameSpec,
    ImageReadError,
    UltrasoundImage,
    _describe,
    _luma,
    _resolve_frame,
)


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
