"""Where the nodule is: the thyroid capsule's distance map (the paper's Central Point Distance
Transformation, CPDT), the location map phi, the nodule's capsule distance and its position along the lobe, plus
the checked masks and pixel spacing they are computed from. Pure functions of numpy arrays, identical at every
site; `shared_model.sitedata.preprocessing` turns them into the location channel and the per-view scalars.

**Capsule = the thyroid mask's outermost pixel ring.** The CPDT distance of a thyroid pixel is the Euclidean
distance (anisotropic, in mm when calibrated) between its centre and the centre of the nearest capsule pixel, so
a nodule touching the capsule gets d = 0 and phi = 1 there (see :func:`capsule_distance_map`; the numbers behind
this choice are in ``docs/preprocessing.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "as_mask",
    "capsule_distance",
    "capsule_distance_map",
    "check_spacing",
    "cpdt",
    "location_map",
    "mask_bbox",
    "nodule_position",
    "nodule_position_of",
]

_CROSS = ndimage.generate_binary_structure(2, 1)


# ------------------------------------------------------------------------------------------------ checks


def check_spacing(spacing_mm: Sequence[float] | None) -> tuple[float, float]:
    """(row, col) step used for distances: the calibration, or (1, 1) pixel when uncalibrated."""
    if spacing_mm is None:
        return (1.0, 1.0)
    try:
        row_mm, col_mm = (float(v) for v in spacing_mm)
    except (TypeError, ValueError):
        raise ValueError(
            f"spacing_mm must be two numbers (row_mm, col_mm) or None, got {spacing_mm!r}"
        ) from None
    if not (math.isfinite(row_mm) and math.isfinite(col_mm) and row_mm > 0 and col_mm > 0):
        raise ValueError(f"spacing_mm must be two positive numbers (row_mm, col_mm), got {spacing_mm!r}")
    return (row_mm, col_mm)


def as_mask(mask: np.ndarray, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} is {arr.shape[0]}x{arr.shape[1]} but the image is {shape[0]}x{shape[1]}")
    return arr.astype(bool, copy=False)


# ------------------------------------------------------------------------------------------------ CPDT


def capsule_distance_map(thyroid_mask: np.ndarray, spacing_mm: Sequence[float] | None = None) -> np.ndarray:
    """CPDT distance d of every pixel to the thyroid capsule, in mm (pixels when ``spacing_mm`` is None).

    The capsule is the thyroid mask's outermost ring: thyroid pixels with at least one 4-connected
    neighbour outside the thyroid. Inside the thyroid, d is measured centre to centre to the nearest capsule
    pixel with ``scipy.ndimage.distance_transform_edt(sampling=spacing_mm)``, so capsule pixels have d = 0.
    This is one pixel (along an axis) less than the EDT to the nearest *outside* pixel, and half a pixel less
    than the distance to the mask's geometric edge; we do not subtract anything further. Why: the capsule is a
    thin bright line that segmentations include in the lobe, so the outermost mask pixels are the capsule
    itself, and a nodule that reaches them touches the capsule (phi = 1), as the paper requires.

    Pixels outside the thyroid are at or beyond the capsule and get d = 0. The image border is *not* capsule:
    a lobe cut off by the field of view continues beyond it. Returns float64, same shape as the mask.

    Raises:
        ValueError: the mask is empty or has no capsule pixel inside the image (it fills the whole frame).
    """
    thyroid = as_mask(thyroid_mask, "thyroid_mask")
    spacing = check_spacing(spacing_mm)
    if not thyroid.any():
        raise ValueError("thyroid_mask is empty: no capsule to measure distances to")
    # Work in the thyroid's bounding box plus one pixel: every capsule pixel is in it, and the extra ring
    # (outside the thyroid, unless it is beyond the image) is what makes the outermost pixels capsule.
    r0, r1, c0, c1 = mask_bbox(thyroid)
    r0, c0 = max(0, r0 - 1), max(0, c0 - 1)
    r1, c1 = min(thyroid.shape[0], r1 + 2), min(thyroid.shape[1], c1 + 2)
    window = thyroid[r0:r1, c0:c1]
    interior = ndimage.binary_erosion(window, structure=_CROSS, border_value=1)
    capsule = window & ~interior
    if not capsule.any():
        raise ValueError("thyroid_mask fills the whole image: its capsule is not visible, CPDT is undefined")
    distance = np.zeros(thyroid.shape, dtype=np.float64)
    distance[r0:r1, c0:c1] = np.where(window, ndimage.distance_transform_edt(~capsule, sampling=spacing), 0.0)
    return distance


def cpdt(
    thyroid: np.ndarray, nodule: np.ndarray, spacing_mm: Sequence[float] | None
) -> tuple[np.ndarray, float, float]:
    """phi map, d_max and the nodule's capsule distance, from one distance transform."""
    distance = capsule_distance_map(thyroid, spacing_mm)
    d_max = float(distance.max())  # outside the thyroid d is 0, so this is the maximum over the thyroid
    phi = np.zeros(thyroid.shape, dtype=np.float32)
    inside = nodule & thyroid
    if d_max > 0:
        phi[inside] = (1.0 - distance[inside] / d_max).astype(np.float32)
    else:
        phi[inside] = 1.0
    phi[nodule & ~thyroid] = 1.0
    nearest = float(distance[nodule].min()) if nodule.any() else math.nan
    return phi, d_max, nearest


def location_map(
    thyroid_mask: np.ndarray, nodule_mask: np.ndarray, spacing_mm: Sequence[float] | None = None
) -> np.ndarray:
    """The paper's CPDT map phi = 1 - d / d_max on the nodule, 0 elsewhere (float32, shape of the masks).

    ``d`` is :func:`capsule_distance_map` (mm when calibrated, so anisotropic pixels are handled), ``d_max``
    the largest ``d`` inside the thyroid (the lobe's central point, farthest from the capsule). Nodule pixels
    outside the thyroid (extrathyroidal extension, or a loose segmentation) are at or beyond the capsule and
    get 1. A thyroid so thin that every pixel is capsule has d_max = 0; its nodule pixels get 1.
    """
    thyroid = as_mask(thyroid_mask, "thyroid_mask")
    nodule = as_mask(nodule_mask, "nodule_mask", thyroid.shape)
    return cpdt(thyroid, nodule, spacing_mm)[0]


def capsule_distance(
    thyroid_mask: np.ndarray, nodule_mask: np.ndarray, spacing_mm: Sequence[float] | None = None
) -> float:
    """Smallest capsule distance d of any nodule pixel (mm when calibrated, else pixels).

    0 when the nodule touches the capsule ring or extends outside the thyroid. The paper reports LLNM risk
    above 72% when this is under 2.5 mm, which is why it is kept per view beside the tensors.
    """
    thyroid = as_mask(thyroid_mask, "thyroid_mask")
    nodule = as_mask(nodule_mask, "nodule_mask", thyroid.shape)
    if not nodule.any():
        raise ValueError("nodule_mask is empty: no capsule distance")
    return cpdt(thyroid, nodule, spacing_mm)[2]


def nodule_position(thyroid_mask: np.ndarray, nodule_mask: np.ndarray) -> float:
    """Position of the nodule's centroid along the thyroid's horizontal extent: 0 left end, 1 right end.

    The extent is that of the thyroid mask's columns (first to last thyroid pixel, centre to centre); the
    value is clipped to [0, 1] (a nodule bulging beyond the gland's end counts as at that end). It is a ratio
    of columns, so it needs no calibration. In a longitudinal view it says which third of the lobe the nodule
    is in, the paper's second location finding (upper and middle thirds carry more risk than the lower).

    Raises:
        ValueError: either mask is empty.
    """
    thyroid = as_mask(thyroid_mask, "thyroid_mask")
    nodule = as_mask(nodule_mask, "nodule_mask", thyroid.shape)
    if not thyroid.any():
        raise ValueError("thyroid_mask is empty: no extent to place the nodule in")
    if not nodule.any():
        raise ValueError("nodule_mask is empty: no nodule to place")
    return nodule_position_of(thyroid, nodule)


def nodule_position_of(thyroid: np.ndarray, nodule: np.ndarray) -> float:
    """:func:`nodule_position` of two boolean masks already checked to be non-empty and of one shape."""
    _, _, c0, c1 = mask_bbox(thyroid)
    centre = float(np.nonzero(nodule)[1].mean())
    if c1 == c0:
        return 0.5
    return float(np.clip((centre - c0) / (c1 - c0), 0.0, 1.0))



def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) inclusive bounds of a non-empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
