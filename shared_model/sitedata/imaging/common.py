"""What the image and mask readers share: the result type, the error, file sniffing and frame choice."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
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


def _describe(exc: BaseException) -> str:
    """A short one-line description of a library exception for an error message."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _frame_choice(frame: FrameSpec, path: Path) -> str | int:
    """The frame argument checked on its own (``ValueError`` when malformed), before any file is opened."""
    if isinstance(frame, str) and frame.strip().startswith("-") and frame.strip()[1:].isdigit():
        frame = int(frame)
    if isinstance(frame, numbers.Integral) and not isinstance(frame, bool) and frame < 0:
        return int(frame)  # an index, just not one that exists
    try:
        return parse_frame(frame)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _resolve_frame(frame: FrameSpec, frames: int, path: Path) -> int:
    """Turn a frame choice into a 0-based index.

    ``"first"`` is 0, ``"last"`` is ``frames - 1`` and ``"middle"`` is ``frames // 2`` (for an even count the
    later of the two central frames; for 65 frames, frame 32). An integer (or a string of digits, as given on
    the command line) is a 0-based index and must exist in the file: a wrong index is an error, never clamped.
    """
    choice = _frame_choice(frame, path)
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
