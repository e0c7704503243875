"""What the segmenter reads and how its outputs map back: windows of a frame, samples and views (no file reading).

A frame is shown to the segmenter through square windows on its ``S x S`` canvas (`Window`): the whole frame,
letterboxed so that a nodule keeps its shape (`letterbox`), and a window around the nodule (`nodule_window`), where a
small nodule spans many canvas pixels. `shared_model.sitedata.segmentation_inputs` fills these from a site's files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NODULE_MARGIN", "NODULE_MIN_SIDE", "Sample", "SegmentationView", "Window", "largest_component",
           "letterbox", "nodule_window"]


@dataclass(frozen=True)
class Window:
    """A square of `side` frame pixels with its top-left corner at (`top`, `left`) (it may reach past the frame,
    which reads as 0), shown on a ``size x size`` canvas. The whole frame is one window (`letterbox`); a nodule's
    neighbourhood is another (`nodule_window`)."""

    rows: int
    columns: int
    size: int
    side: int
    top: int
    left: int

    @property
    def scale(self) -> float:
        """Canvas pixels per frame pixel."""
        return self.size / self.side

    def _overlap(self) -> tuple[slice, slice, slice, slice]:
        """(frame rows, frame columns, window rows, window columns) where the window and the frame overlap."""
        r0, c0 = max(self.top, 0), max(self.left, 0)
        r1, c1 = min(self.top + self.side, self.rows), min(self.left + self.side, self.columns)
        r1, c1 = max(r1, r0), max(c1, c0)
        return (slice(r0, r1), slice(c0, c1),
                slice(r0 - self.top, r1 - self.top), slice(c0 - self.left, c1 - self.left))

    def covers(self) -> np.ndarray:
        """The frame's pixels inside the window (boolean, ``rows x columns``)."""
        fr, fc, _, _ = self._overlap()
        out = np.zeros((self.rows, self.columns), dtype=bool)
        out[fr, fc] = True
        return out

    def to_canvas(self, array: np.ndarray, *, mask: bool) -> np.ndarray:
        """The window of a frame-sized array, resized onto the canvas (a mask thresholded at one half)."""
        fr, fc, wr, wc = self._overlap()
        square = np.zeros((self.side, self.side), dtype=np.float32)
        square[wr, wc] = array[fr, fc]
        src = torch.from_numpy(square)[None, None]
        mode = "area" if self.side >= self.size else "bilinear"
        canvas = F.interpolate(src, size=(self.size, self.size), mode=mode,
                               **({} if mode == "area" else {"align_corners": False}))[0, 0].numpy()
        return (canvas >= 0.5).astype(np.float32) if mask else canvas

    def to_frame(self, canvas: np.ndarray) -> np.ndarray:
        """A canvas-sized probability map back on the frame's pixels (bilinear), ``rows x columns``, 0 outside the
        window."""
        src = torch.from_numpy(np.ascontiguousarray(canvas, dtype=np.float32))[None, None]
        square = F.interpolate(src, size=(self.side, self.side), mode="bilinear", align_corners=False)[0, 0].numpy()
        out = np.zeros((self.rows, self.columns), dtype=np.float32)
        fr, fc, wr, wc = self._overlap()
        out[fr, fc] = square[wr, wc]
        return out


def letterbox(rows: int, columns: int, size: int) -> Window:
    """The whole ``rows x columns`` frame, centred in a square window of its longer side."""
    side = max(rows, columns)
    return Window(rows, columns, size, side, -((side - rows) // 2), -((side - columns) // 2))


#: The nodule window: the nodule's larger extent plus this fraction of it on every side, and at least this many
#: frame pixels across.
NODULE_MARGIN = 0.5
NODULE_MIN_SIDE = 32


def nodule_window(mask: np.ndarray, size: int, *, margin: float = NODULE_MARGIN, shift: tuple[float, float] = (0, 0)
                  ) -> Window | None:
    """A square window around a nodule mask's bounding box (None for an empty mask); ``shift`` moves its centre by
    that fraction of its side (training jitter)."""
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask)
    extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    side = max(int(np.ceil(extent * (1.0 + 2.0 * margin))), NODULE_MIN_SIDE)
    centre_r = (rows.min() + rows.max()) / 2.0 + shift[0] * side
    centre_c = (cols.min() + cols.max()) / 2.0 + shift[1] * side
    return Window(mask.shape[0], mask.shape[1], size, side, round(centre_r - side / 2.0), round(centre_c - side / 2.0))


@dataclass
class Sample:
    """One training input of the segmenter: a canvas ``[S, S]``, its targets ``[C, S, S]`` and what is drawn."""

    image: np.ndarray
    targets: np.ndarray
    drawn: np.ndarray


@dataclass
class SegmentationView:
    """One view of one patient as the segmenter sees it.

    ``whole`` is the letterboxed frame (`window`) with its targets (zeros where not drawn); ``crops`` are windows
    around the drawn nodule, jittered, that teach the segmenter the nodule at a finer scale (training views only).
    ``frame`` (the normalised frame) and ``frame_masks`` (the drawn masks at the frame's own pixels) are kept for
    views outside the training split, to predict at two scales and to score in mm. ``spacing_mm`` is (row, column)
    mm per frame pixel, None when uncalibrated.
    """

    patient_id: str
    view: str
    split: str
    row: int
    image_path: Path
    whole: Sample
    window: Window
    spacing_mm: tuple[float, float] | None
    crops: list[Sample] = field(default_factory=list)
    frame: np.ndarray | None = None
    frame_masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def drawn(self) -> np.ndarray:
        return self.whole.drawn

    @property
    def samples(self) -> list[Sample]:
        return [self.whole, *self.crops]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (one nodule per view, as the data contract has it)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)
