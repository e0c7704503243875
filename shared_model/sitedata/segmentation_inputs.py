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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.config import PreprocessConfig
from shared_model.evaluation.segmentation import overlap_scores, predicted_masks
from shared_model.model.segmenter import STRUCTURES
from shared_model.model.segmenter_data import (
    Sample,
    SegmentationView,
    Window,
    letterbox,
    nodule_window,
)
from shared_model.sitedata.contract import load_site
from shared_model.sitedata.geometry import capsule_distance
from shared_model.sitedata.records import VIEWS, PatientRecord, Site

__all__ = ["SegmentationInputs", "has_drawn_mask", "load_segmentation_inputs", "normalise_frame", "sample_in",
           "score_view"]


def normalise_frame(pixels: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] by the 0.5th and 99.5th percentiles of the frame's non-zero pixels."""
    values = pixels[pixels > 0]
    if values.size < 16:
        return np.zeros_like(pixels, dtype=np.float32)
    lo, hi = np.percentile(values, [0.5, 99.5])
    return np.clip((pixels - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


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


def has_drawn_mask(patient: PatientRecord) -> bool:
    """Whether any view of the patient with an image has a drawn thyroid or nodule mask (what a segmenter trains and
    is scored on)."""
    return any(files.image is not None and (files.thyroid_mask is not None or files.nodule_mask is not None)
               for files in patient.views.values())


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


def score_view(frame_probabilities: dict[str, np.ndarray], view: SegmentationView) -> dict[str, Any]:
    """Scores of one view's prediction (`segmenter_training.predict_frames`) against its drawn masks
    (`view.frame_masks`): per drawn structure ``dice``, ``iou`` and ``hd95_mm`` (`evaluation.segmentation`), and
    where both structures are drawn and found, ``capsule_error_mm``: the capsule distance from the predicted masks
    minus the one from the drawn masks (`geometry.capsule_distance`, the distance of the paper's 2.5 mm finding)."""
    pred = predicted_masks(frame_probabilities)
    out: dict[str, Any] = overlap_scores(pred, view.frame_masks, view.spacing_mm)
    drawn = view.frame_masks
    if view.spacing_mm and "thyroid" in out and "nodule" in out and pred["nodule"].any() and pred["thyroid"].any():
        true_d = capsule_distance(drawn["thyroid"], drawn["nodule"], view.spacing_mm)
        out["capsule_error_mm"] = capsule_distance(pred["thyroid"], pred["nodule"], view.spacing_mm) - true_d
    return out
