"""Where each patient's nodule is (capsule distance, lobe third), for the counts by location bin.

The capsule distance of a patient is the smallest calibrated distance (mm) over its views; a patient without
a calibrated one is left out of the capsule bins. The third is read from the longitudinal view's nodule
position along the gland (cranial end first, by sonographic convention on screen).
"""

from __future__ import annotations

import numpy as np

from shared_model.config.inputs import InputsConfig
from shared_model.evaluation.explanation import CAPSULE_BIN_EDGES_MM, LOBE_THIRDS
from shared_model.sitedata.tensors import SiteTensors

__all__ = ["capsule_bin", "patient_locations"]

LONGITUDINAL_VIEW = 1


def patient_locations(tensors: SiteTensors, inputs: InputsConfig) -> tuple[np.ndarray, np.ndarray]:
    """Capsule distance in mm (NaN unknown) and third index (-1 unknown) per patient."""
    n = len(tensors.patient_ids)
    capsule = np.full(n, np.nan)
    third = np.full(n, -1, dtype=int)
    if not inputs.images:
        return capsule, third
    dist = tensors.extras.get("capsule_distance")
    calibrated = tensors.extras.get("calibrated")
    if dist is not None and calibrated is not None:
        d = np.asarray(dist, dtype=float).copy()
        d[~np.asarray(calibrated, dtype=bool)] = np.nan
        with np.errstate(all="ignore"):
            known = np.isfinite(d).any(axis=1)
            capsule[known] = np.nanmin(d[known], axis=1)
    names = list(inputs.feature_names)
    if "nodule_position" in names:
        j = names.index("nodule_position")
        value = tensors.clinical[:, LONGITUDINAL_VIEW, j].double().numpy()
        known = tensors.clinical_mask[:, LONGITUDINAL_VIEW, j].numpy() > 0.5
        position = (value + 1.0) / 2.0  # the scalar is 2p - 1 (shared_model.sitedata.tensors)
        third[known] = np.clip((position[known] * 3).astype(int), 0, len(LOBE_THIRDS) - 1)
    return capsule, third


def capsule_bin(capsule_mm: np.ndarray) -> np.ndarray:
    """Bin index of each distance (-1 where unknown)."""
    out = np.full(capsule_mm.shape, -1, dtype=int)
    known = np.isfinite(capsule_mm)
    out[known] = np.clip(np.searchsorted(CAPSULE_BIN_EDGES_MM, capsule_mm[known], side="right") - 1, 0,
                         len(CAPSULE_BIN_EDGES_MM) - 2)
    return out
