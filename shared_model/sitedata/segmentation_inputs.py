"""A site's ultrasound views as segmenter inputs: letterboxed grey frames and, where drawn, their two masks.

Every view with an image becomes one `SegmentationView`, whether or not its masks were drawn: a segmenter trains on
the structures drawn (`SegmentationView.drawn`) and predicts for every view. The frame is letterboxed to ``S x S``
(scaled so its longer side is S, centred, padded with 0) so that a nodule keeps its shape, and `Letterbox` maps a
prediction back onto the frame's own pixels. Intensities are scaled per frame to the 0.5th-99.5th percentile of its
non-zero pixels (the sector's black background and the site's brightness settings set nothing).

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
from shared_model.sitedata.records import VIEWS, Site

__all__ = ["Letterbox", "SegmentationInputs", "SegmentationView", "letterbox", "load_segmentation_inputs",
           "normalise_frame"]


@dataclass(frozen=True)
class Letterbox:
    """Where a ``rows x columns`` frame sits in the ``size x size`` canvas: scaled by `scale`, offset by
    (`top`, `left`), the rest zero."""

    rows: int
    columns: int
    size: int
    scale: float
    top: int
    left: int

    @property
    def inner(self) -> tuple[int, int]:
        """Rows and columns the frame covers in the canvas."""
        return (max(1, round(self.rows * self.scale)), max(1, round(self.columns * self.scale)))

    def to_canvas(self, array: np.ndarray, *, mask: bool) -> np.ndarray:
        """A frame-sized array on the canvas: area-averaged (a mask then thresholded at one half)."""
        h, w = self.inner
        src = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
        small = F.interpolate(src, size=(h, w), mode="area")[0, 0].numpy()
        canvas = np.zeros((self.size, self.size), dtype=np.float32)
        canvas[self.top : self.top + h, self.left : self.left + w] = (small >= 0.5) if mask else small
        return canvas

    def to_frame(self, canvas: np.ndarray) -> np.ndarray:
        """A canvas-sized probability map back on the frame's pixels (bilinear), shape ``rows x columns``."""
        h, w = self.inner
        inner = torch.from_numpy(np.ascontiguousarray(canvas[self.top : self.top + h, self.left : self.left + w],
                                                      dtype=np.float32))[None, None]
        return F.interpolate(inner, size=(self.rows, self.columns), mode="bilinear", align_corners=False)[0, 0].numpy()


def letterbox(rows: int, columns: int, size: int) -> Letterbox:
    """The letterbox of a ``rows x columns`` frame in a ``size x size`` canvas."""
    scale = size / max(rows, columns)
    h, w = max(1, round(rows * scale)), max(1, round(columns * scale))
    return Letterbox(rows, columns, size, scale, (size - h) // 2, (size - w) // 2)


def normalise_frame(pixels: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] by the 0.5th and 99.5th percentiles of the frame's non-zero pixels."""
    values = pixels[pixels > 0]
    if values.size < 16:
        return np.zeros_like(pixels, dtype=np.float32)
    lo, hi = np.percentile(values, [0.5, 99.5])
    return np.clip((pixels - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


@dataclass
class SegmentationView:
    """One view of one patient as the segmenter sees it.

    ``image`` is ``[S, S]``; ``targets`` ``[len(STRUCTURES), S, S]`` (zeros where not drawn); ``drawn`` says which
    structures were drawn. ``frame_masks`` keeps the drawn masks at the frame's own resolution (for scoring in mm)
    and is only filled for views outside the training split. ``spacing_mm`` is (row, column) mm per frame pixel,
    None when uncalibrated.
    """

    patient_id: str
    view: str
    split: str
    row: int
    image_path: Path
    image: np.ndarray
    targets: np.ndarray
    drawn: np.ndarray
    box: Letterbox
    spacing_mm: tuple[float, float] | None
    frame_masks: dict[str, np.ndarray] = field(default_factory=dict)


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


def load_segmentation_inputs(site_dir: str | Path, size: int, pre: PreprocessConfig | None = None,
                             site: Site | None = None) -> SegmentationInputs:
    """Every view of the site's valid patients, letterboxed to ``size``, with its drawn masks where they exist.

    The site's table is read and checked as `llnm-site check` reads it (`load_site`); its row problems are left to
    that check. A view whose files fail to read is reported by file and row and skipped.
    """
    from shared_model.sitedata.imaging import ImageReadError, read_image, read_mask, select_region

    pre = pre or PreprocessConfig()
    site = site or load_site(site_dir)
    views: list[SegmentationView] = []
    problems: list[str] = []
    for patient in site.patients:
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
            box = letterbox(shape[0], shape[1], size)
            targets = np.zeros((len(STRUCTURES), size, size), dtype=np.float32)
            drawn = np.zeros(len(STRUCTURES), dtype=bool)
            for i, name in enumerate(STRUCTURES):
                if masks[name] is not None:
                    targets[i] = box.to_canvas(masks[name], mask=True)
                    drawn[i] = True
            item = SegmentationView(
                patient_id=patient.patient_id, view=view, split=patient.split, row=patient.row,
                image_path=files.image, image=box.to_canvas(normalise_frame(image.pixels), mask=False),
                targets=targets, drawn=drawn, box=box, spacing_mm=image.spacing_mm)
            if patient.split != "train":
                item.frame_masks = {name: m for name, m in masks.items() if m is not None}
            views.append(item)
    return SegmentationInputs(site.name, views, problems)
