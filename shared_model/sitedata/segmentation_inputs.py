"""A site's ultrasound views as segmenter inputs: letterboxed grey frames and, where drawn, their two masks.

Every view with an image becomes one `SegmentationView`, whether or not its masks were drawn: a segmenter trains on
the structures drawn (`SegmentationView.drawn`) and predicts for every view. The segmenter sees square windows of
the frame on an ``S x S`` canvas (`Window`): the whole frame, letterboxed so that a nodule keeps its shape, and a
window around the nodule, where a small nodule spans many canvas pixels (the paper likewise finds the nodule before
it outlines it). `Window.to_frame` maps a prediction back onto the frame's own pixels. Intensities are scaled per
frame to the 0.5th-99.5th percentile of its non-zero pixels (the sector's black background and the site's
brightness settings set nothing).

A view whose image or mask cannot be read is reported by file and row (`SegmentationInputs.problems`) and left out;
the other views load. Nothing is written anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared_model.config import PreprocessConfig
from shared_model.model.segmenter import STRUCTURES
from shared_model.sitedata.contract import load_site
from shared_model.sitedata.records import VIEWS, PatientRecord, Site

__all__ = ["Sample", "SegmentationInputs", "SegmentationView", "Window", "letterbox", "load_segmentation_inputs",
           "nodule_window", "normalise_frame", "sample_in"]


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


def normalise_frame(pixels: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] by the 0.5th and 99.5th percentiles of the frame's non-zero pixels."""
    values = pixels[pixels > 0]
    if values.size < 16:
        return np.zeros_like(pixels, dtype=np.float32)
    lo, hi = np.percentile(values, [0.5, 99.5])
    return np.clip((pixels - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


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


@dataclass
class SegmentationInputs:
    """A site's views (`views`), and one line per view that could not be read (`problems`)."""

    site: str
    views: list[SegmentationView]
    problems: list[str]

    def subset(self, split: str) -> list[SegmentationView]:
        return [v for v in self.views if v.split == split]

    def drawn_counts(self) -> dict[str, int]:
        """Views with each structure drawn."""
        return {name: int(sum(bool(v.drawn[i]) for v in self.views)) for i, name in enumerate(STRUCTURES)}


def sample_in(window: Window, frame: np.ndarray, masks: dict[str, np.ndarray | None]) -> Sample:
    """The canvas of `window` over a normalised frame and its drawn masks."""
    targets = np.zeros((len(STRUCTURES), window.size, window.size), dtype=np.float32)
    drawn = np.zeros(len(STRUCTURES), dtype=bool)
    for i, name in enumerate(STRUCTURES):
        mask = masks.get(name)
        if mask is not None:
            targets[i] = window.to_canvas(mask, mask=True)
            drawn[i] = True
    return Sample(window.to_canvas(frame, mask=False), targets, drawn)


#: Nodule crops per training view with a drawn nodule, and their jitter: the centre moves by up to this fraction
#: of the window's side, and the margin is drawn from this range.
CROPS_PER_VIEW = 2
CROP_SHIFT = 0.15
CROP_MARGIN = (0.3, 0.8)


def load_segmentation_inputs(site_dir: str | Path, size: int, pre: PreprocessConfig | None = None,
                             site: Site | None = None, seed: int = 0, *, patients: list[PatientRecord] | None = None,
                             for_prediction: bool = False) -> SegmentationInputs:
    """Every view of the site's valid patients (or of `patients`), letterboxed to ``size``, with its drawn masks
    where they exist, and for training views with a drawn nodule `CROPS_PER_VIEW` jittered nodule windows (drawn
    from ``seed``). With ``for_prediction`` every view keeps its frame (to be segmented at two scales) and none gets
    crops.

    The site's table is read and checked as `llnm-site check` reads it (`load_site`); its row problems are left to
    that check. A view whose files fail to read is reported by file and row and skipped.
    """
    from shared_model.sitedata.imaging import ImageReadError, read_image, read_mask, select_region

    pre = pre or PreprocessConfig()
    site = site or load_site(site_dir)
    rng = np.random.default_rng(seed)
    views: list[SegmentationView] = []
    problems: list[str] = []
    for patient in site.patients if patients is None else patients:
        for view in VIEWS:
            files = patient.views[view]
            if files.image is None:
                continue
            try:
                image = read_image(files.image, frame=pre.frame, table_spacing_mm=files.table_spacing_mm)
                shape = image.pixels.shape
                masks = {"thyroid": read_mask(files.thyroid_mask, expected_shape=shape)
                         if files.thyroid_mask is not None else None,
                         "nodule": read_mask(files.nodule_mask, expected_shape=shape)
                         if files.nodule_mask is not None else None}
            except (ImageReadError, ValueError, OSError) as exc:
                problems.append(f"{site.relative(files.image)} (patients.csv row {patient.row}, {view} view): {exc}")
                continue
            nodule = masks["nodule"]
            if nodule is not None and nodule.any():  # the drawn nodule picks the calibrated region, as in training
                rows, cols = np.nonzero(nodule)
                image = select_region(image, (float(rows.mean()), float(cols.mean())))
            frame = normalise_frame(image.pixels)
            window = letterbox(shape[0], shape[1], size)
            item = SegmentationView(
                patient_id=patient.patient_id, view=view, split=patient.split, row=patient.row,
                image_path=files.image, whole=sample_in(window, frame, masks), window=window,
                spacing_mm=image.spacing_mm)
            if not for_prediction and patient.split == "train" and nodule is not None and nodule.any():
                for _ in range(CROPS_PER_VIEW):
                    crop = nodule_window(nodule, size, margin=float(rng.uniform(*CROP_MARGIN)),
                                         shift=tuple(rng.uniform(-CROP_SHIFT, CROP_SHIFT, 2)))
                    assert crop is not None
                    item.crops.append(sample_in(crop, frame, masks))
            if for_prediction or patient.split != "train":
                item.frame = frame.astype(np.float16)
                item.frame_masks = {name: m for name, m in masks.items() if m is not None}
            views.append(item)
    return SegmentationInputs(site.name, views, problems)
