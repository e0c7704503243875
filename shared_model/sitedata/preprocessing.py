"""Per-view preprocessing for LLNM-Net: feature images, the CPDT location map and clinical image scalars.

The paper does not feed the raw ultrasound frame to its transformer. It derives, per view, three feature
images (internal texture ``x_t``, margin ``x_m``, location ``x_l`` via the Central Point Distance
Transformation) and two scalars (shape ``x_s``, echogenicity ``x_e``) from the frame and two segmentations
(nodule and thyroid lobe). This module makes those, as pure functions of numpy arrays, so that they can be
unit-tested on hand-made geometry and are identical at every site. The site-level cache that calls them
lives in :mod:`shared_model.sitedata.cache`.

Why the choices below (details and numbers in ``docs/preprocessing.md``):

* **Physical geometry, never stretched.** Every crop is a square in *millimetres* (pixels when
  uncalibrated), and is resampled to ``S x S`` with per-axis factors derived from the pixel spacing, so a
  nodule keeps its physical aspect ratio (taller-than-wide is a malignancy sign; the paper insists on not
  distorting it). Regions beyond the image are padded with 0 before resizing.
* **Capsule = the thyroid mask's outermost pixel ring**: the CPDT geometry is
  :mod:`shared_model.sitedata.geometry`'s.
* **Values that survive resizing.** The location channel encodes phi as ``0.5 + 0.5 * phi`` on nodule pixels,
  ``0.2`` on the rest of the thyroid and 0 outside; it is resized with exact area averaging of each layer
  separately so phi is never blended with the silhouette and a small nodule never disappears.
* **Site-level brightness range.** Intensities are mapped to [0, 1] with the site's own percentile range
  (the paper's "standardized brightness range"), computed over tissue pixels only (see
  :func:`intensity_sample_region`), so black sector background and burned-in annotations do not set it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

# The schema lives with the other shared schemas; preprocessing is what it configures.
from shared_model.config import PREPROCESSING_VERSION, PreprocessConfig
from shared_model.sitedata.geometry import as_mask, check_spacing, cpdt, mask_bbox, nodule_position_of

__all__ = [
    "LOCATION_NODULE_BASE",
    "LOCATION_THYROID_VALUE",
    "MARGIN_BAND_FLOOR",
    "PREPROCESSING_VERSION",
    "PreprocessConfig",
    "ViewFeatures",
    "intensity_sample_region",
    "normalise_intensity",
    "preprocess_view",
    "resize_square",
    "site_intensity_range",
]

#: Location channel: value of thyroid pixels outside the nodule (the lobe's faint silhouette).
LOCATION_THYROID_VALUE = 0.2
#: Location channel: nodule pixels hold ``LOCATION_NODULE_BASE + (1 - LOCATION_NODULE_BASE) * phi``; phi is
#: recovered exactly as ``(v - 0.5) / 0.5`` for ``v >= 0.5``.
LOCATION_NODULE_BASE = 0.5
#: Margin channel: pixels in the margin band hold ``floor + (1 - floor) * edge``, so the band stays visible
#: where the edge is flat (a very ill-defined margin) and is distinguishable from the 0 outside the band.
MARGIN_BAND_FLOOR = 0.2



# ------------------------------------------------------------------------------------------------ intensity


def intensity_sample_region(
    shape: tuple[int, int],
    nodule_mask: np.ndarray | None,
    thyroid_mask: np.ndarray | None,
    spacing_mm: Sequence[float] | None,
    crop_margin: float,
) -> np.ndarray:
    """Tissue pixels for the site's brightness range: the thyroid mask plus the nodule's crop window.

    Ultrasound frames are mostly black sector background, scale bars and burned-in text, whose share varies by
    vendor and depth setting; percentiles over whole frames would measure that, not tissue. When a view has no
    masks at all, the whole frame is used.
    """
    region = np.zeros(shape, dtype=bool)
    if thyroid_mask is not None:
        region |= as_mask(thyroid_mask, "thyroid_mask", shape)
    if nodule_mask is not None:
        nodule = as_mask(nodule_mask, "nodule_mask", shape)
        if nodule.any():
            center, half = _square_window(nodule, check_spacing(spacing_mm), crop_margin)
            r0, r1 = max(0, math.floor(center[0] - half[0])), min(shape[0], math.ceil(center[0] + half[0]))
            c0, c1 = max(0, math.floor(center[1] - half[1])), min(shape[1], math.ceil(center[1] + half[1]))
            region[r0:r1, c0:c1] = True
    if not region.any():
        region[:] = True
    return region


def site_intensity_range(
    images: Iterable[np.ndarray],
    percentiles: tuple[float, float] = (1.0, 99.0),
    *,
    regions: Iterable[np.ndarray | None] | None = None,
    max_samples_per_image: int = 20000,
) -> tuple[float, float]:
    """The site's brightness range (lo, hi): the given percentiles of its images' (tissue) pixels.

    Each image contributes at most ``max_samples_per_image`` pixels, taken with an even stride
    (deterministic, so the same site always gets the same range and the same cache). ``regions`` optionally
    restricts each image to a boolean mask (see :func:`intensity_sample_region`).

    Raises:
        ValueError: no pixels at all, or a non-finite value.
    """
    low_p, high_p = (float(p) for p in percentiles)
    if not 0.0 <= low_p < high_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    if max_samples_per_image < 1:
        raise ValueError(f"max_samples_per_image must be >= 1, got {max_samples_per_image}")
    region_iter = iter(regions) if regions is not None else None
    samples: list[np.ndarray] = []
    for index, image in enumerate(images):
        arr = np.asarray(image, dtype=np.float32)
        region = next(region_iter, None) if region_iter is not None else None
        values = arr[as_mask(region, f"region {index}", arr.shape)] if region is not None else arr.ravel()
        if values.size == 0:
            continue
        step = max(1, math.ceil(values.size / max_samples_per_image))
        samples.append(values[::step])
    if not samples:
        raise ValueError("no image pixels to estimate the site's intensity range from")
    pooled = np.concatenate(samples)
    if not np.isfinite(pooled).all():
        raise ValueError("image pixels contain NaN or infinite values")
    lo, hi = (float(v) for v in np.percentile(pooled, [low_p, high_p]))
    if hi <= lo:
        # Every sampled pixel is the same grey: keep a unit-wide range so normalisation stays defined.
        hi = lo + 1.0
    return lo, hi


def normalise_intensity(pixels: np.ndarray, intensity_range: tuple[float, float]) -> np.ndarray:
    """(x - lo) / (hi - lo), clipped to [0, 1], as float32."""
    lo, hi = (float(v) for v in intensity_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"intensity_range must be two finite numbers with hi > lo, got {intensity_range!r}")
    out = (np.asarray(pixels, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


# ------------------------------------------------------------------------------------------------ geometry


def _square_window(
    mask: np.ndarray, spacing: tuple[float, float], margin: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centre (row, col) and half-extents (rows, cols), in pixel units, of a physically square crop.

    Coordinates are continuous with pixel i covering [i, i + 1). The crop's side is the bounding box's
    larger physical side times (1 + 2 * margin); its half-extent in pixels differs per axis when pixels are
    not square.
    """
    r0, r1, c0, c1 = mask_bbox(mask)
    height_mm = (r1 - r0 + 1) * spacing[0]
    width_mm = (c1 - c0 + 1) * spacing[1]
    side_mm = max(height_mm, width_mm) * (1.0 + 2.0 * margin)
    center = ((r0 + r1 + 1) / 2.0, (c0 + c1 + 1) / 2.0)
    half = (side_mm / 2.0 / spacing[0], side_mm / 2.0 / spacing[1])
    return center, half


def resize_square(
    array: np.ndarray,
    center: tuple[float, float],
    half: tuple[float, float],
    size: int,
    resample: Image.Resampling,
) -> np.ndarray:
    """Sample the window ``center +- half`` (continuous pixel coordinates) of ``array`` onto ``size x size``.

    The window is cut from a zero-padded copy, so parts outside the image are 0, and PIL resamples it with
    fractional box coordinates: no rounding of the window, and PIL's filters are antialiased when they shrink.
    A window that is square in millimetres therefore comes out undistorted whatever the pixel spacing.
    """
    arr = np.asarray(array, dtype=np.float32)
    top, bottom = center[0] - half[0], center[0] + half[0]
    left, right = center[1] - half[1], center[1] + half[1]
    pad_r = max(0, math.ceil(-top), math.ceil(bottom - arr.shape[0])) + 1
    pad_c = max(0, math.ceil(-left), math.ceil(right - arr.shape[1])) + 1
    r_lo, r_hi = max(0, math.floor(top) - 1), min(arr.shape[0], math.ceil(bottom) + 1)
    c_lo, c_hi = max(0, math.floor(left) - 1), min(arr.shape[1], math.ceil(right) + 1)
    # Only the part of the image the window touches is copied into the padded canvas (frames can be large).
    canvas = np.zeros((r_hi - r_lo + 2 * pad_r, c_hi - c_lo + 2 * pad_c), dtype=np.float32)
    if r_hi > r_lo and c_hi > c_lo:
        canvas[pad_r : pad_r + r_hi - r_lo, pad_c : pad_c + c_hi - c_lo] = arr[r_lo:r_hi, c_lo:c_hi]
    off_r, off_c = pad_r - r_lo, pad_c - c_lo
    box = (left + off_c, top + off_r, right + off_c, bottom + off_r)
    out = Image.fromarray(canvas, mode="F").resize((size, size), resample=resample, box=box)
    return np.asarray(out, dtype=np.float32).copy()


# ------------------------------------------------------------------------------------------- view features


@dataclass(frozen=True)
class ViewFeatures:
    """The model inputs of one view, plus what was measured and what was missing.

    Attributes:
        channels: ``[3, S, S]`` float32 in [0, 1]: 0 nodule texture, 1 margin, 2 location (CPDT).
        shape_ratio: nodule height / width in physical units (> 1 is taller-than-wide).
        echogenicity: mean normalised intensity inside the nodule minus that of its reference tissue
            (``echo_reference``), in [-1, 1]; negative is hypoechoic.
        capsule_distance_mm: nodule-to-capsule distance; None without a (usable) thyroid mask.
        nodule_area_mm2: nodule area.
        calibrated: False means the three lengths/areas above are in pixels / pixels squared.
        thyroid_missing: no usable thyroid mask: the location channel is all zeros.
        echo_reference: ``"thyroid"`` (thyroid minus nodule) or ``"ring"`` (``echo_ring_mm`` around it).
        notes: human-readable remarks (what was missing or degraded).
        nodule_position: where the nodule's centroid lies along the thyroid's horizontal extent on screen,
            0 at its left end and 1 at its right end; None without a usable thyroid mask. In a longitudinal
            view this is the craniocaudal position (upper, middle or lower third: cranial is on the left of
            the screen by sonographic convention); in a transverse one the medio-lateral position.
    """

    channels: np.ndarray
    shape_ratio: float
    echogenicity: float
    capsule_distance_mm: float | None
    nodule_area_mm2: float
    calibrated: bool
    thyroid_missing: bool
    echo_reference: str
    notes: tuple[str, ...] = ()
    nodule_position: float | None = None


def _margin_channel(
    image: np.ndarray, nodule: np.ndarray, spacing: tuple[float, float], cfg: PreprocessConfig,
    window: tuple[int, int, int, int],
) -> np.ndarray:
    """Edge strength in the band of +-margin_band_mm around the nodule outline (full frame, 0 elsewhere).

    Edge strength is the Gaussian-smoothed gradient magnitude in normalised intensity per mm times the band
    width (the brightness change across one band width), clipped to [0, 1]: a sharp, well-defined margin
    saturates, an ill-defined (blurred) one stays low. It is computed at the native resolution, before the
    crop is shrunk to S, so the sharpness of a large nodule's edge is not lost to resizing. Band pixels hold
    ``MARGIN_BAND_FLOOR + (1 - MARGIN_BAND_FLOOR) * strength``.
    """
    r0, r1, c0, c1 = window
    img = image[r0:r1, c0:c1]
    nod = nodule[r0:r1, c0:c1]
    band_mm = cfg.margin_band_mm
    sigma = tuple(max(0.5, cfg.margin_sigma_mm / s) for s in spacing)
    d_row = ndimage.gaussian_filter(img, sigma=sigma, order=(1, 0), mode="nearest") / spacing[0]
    d_col = ndimage.gaussian_filter(img, sigma=sigma, order=(0, 1), mode="nearest") / spacing[1]
    strength = np.clip(np.hypot(d_row, d_col) * band_mm, 0.0, 1.0)
    inside = ndimage.distance_transform_edt(nod, sampling=spacing)
    outside = ndimage.distance_transform_edt(~nod, sampling=spacing)
    band = np.where(nod, inside <= band_mm, outside <= band_mm)
    out = np.zeros(image.shape, dtype=np.float32)
    out[r0:r1, c0:c1] = np.where(band, MARGIN_BAND_FLOOR + (1.0 - MARGIN_BAND_FLOOR) * strength, 0.0)
    return out


def _location_channel(
    thyroid: np.ndarray, nodule: np.ndarray, phi: np.ndarray, spacing: tuple[float, float],
    cfg: PreprocessConfig,
) -> np.ndarray:
    """Resize the CPDT map of the thyroid crop so phi survives exactly (see module docstring).

    Each layer is area-averaged (PIL BOX): thyroid coverage, nodule coverage c, and phi * nodule. An output
    pixel is nodule where c >= 0.5 (or, if no pixel reaches that, the single most covered pixel, so a nodule
    of a few native pixels still shows); it holds 0.5 + 0.5 * (mean phi of the nodule part under it). Other
    pixels are 0.2 where thyroid coverage >= 0.5, else 0.
    """
    size = cfg.image_size
    center, half = _square_window(thyroid | nodule, spacing, cfg.thyroid_crop_margin)
    box = Image.Resampling.BOX
    thy_cov = resize_square(thyroid.astype(np.float32), center, half, size, box)
    nod_cov = resize_square(nodule.astype(np.float32), center, half, size, box)
    phi_sum = resize_square(phi * nodule, center, half, size, box)
    is_nodule = nod_cov >= 0.5
    if not is_nodule.any():
        is_nodule.flat[int(np.argmax(nod_cov))] = True
    phi_out = np.clip(phi_sum / np.maximum(nod_cov, 1e-12), 0.0, 1.0)
    out = np.where(thy_cov >= 0.5, LOCATION_THYROID_VALUE, 0.0).astype(np.float32)
    out[is_nodule] = LOCATION_NODULE_BASE + (1.0 - LOCATION_NODULE_BASE) * phi_out[is_nodule]
    return out


def preprocess_view(
    pixels: np.ndarray,
    nodule_mask: np.ndarray | None,
    thyroid_mask: np.ndarray | None,
    spacing_mm: Sequence[float] | None,
    cfg: PreprocessConfig,
    intensity_range: tuple[float, float],
) -> ViewFeatures | None:
    """Feature images and scalars of one view; None when the nodule mask is missing or empty.

    Without a nodule outline there is no nodule to crop, measure or locate, and inventing one would feed the
    model a fabricated lesion: the caller marks the view missing instead. Without a thyroid mask the view is
    still usable: the location channel is all zeros, the capsule distance unknown, and echogenicity uses a
    ring of ``cfg.echo_ring_mm`` around the nodule as reference tissue (recorded in ``notes`` and
    ``echo_reference``).

    Channels (all ``S x S``, in [0, 1], physically square crops, never stretched):

    * 0 texture: the normalised image in the nodule crop (bounding box + ``crop_margin``).
    * 1 margin: edge strength in a band of +-``margin_band_mm`` around the outline, same crop.
    * 2 location: CPDT in the crop around the thyroid (and nodule) box + ``thyroid_crop_margin``; nodule
      ``0.5 + 0.5 * phi``, other thyroid 0.2, outside 0.

    Scalars: ``shape_ratio`` from the nodule's axis-aligned extents (rows = depth, the beam direction, vs
    columns), each times its pixel size; ``echogenicity`` = mean inside - mean of reference tissue, in
    normalised intensity; ``capsule_distance_mm``; ``nodule_area_mm2``; ``nodule_position``
    (:func:`nodule_position`).
    """
    image = np.asarray(pixels, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"pixels must be a 2-D grey image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("pixels contain NaN or infinite values")
    shape = image.shape
    if nodule_mask is None:
        return None
    nodule = as_mask(nodule_mask, "nodule_mask", shape)
    if not nodule.any():
        return None
    thyroid = None if thyroid_mask is None else as_mask(thyroid_mask, "thyroid_mask", shape)
    calibrated = spacing_mm is not None
    spacing = check_spacing(spacing_mm)
    notes: list[str] = []
    if not calibrated:
        notes.append("uncalibrated: lengths in pixels, pixels assumed square")
    if thyroid is not None and not thyroid.any():
        notes.append("thyroid mask is empty: treated as missing")
        thyroid = None

    norm = normalise_intensity(image, intensity_range)
    size = cfg.image_size

    # Nodule crop (texture and margin).
    center, half = _square_window(nodule, spacing, cfg.crop_margin)
    bilinear = Image.Resampling.BILINEAR
    texture = resize_square(norm, center, half, size, bilinear)
    pad = [math.ceil((cfg.margin_band_mm + 4 * cfg.margin_sigma_mm) / s) + 2 for s in spacing]
    window = (
        max(0, math.floor(center[0] - half[0]) - pad[0]),
        min(shape[0], math.ceil(center[0] + half[0]) + pad[0]),
        max(0, math.floor(center[1] - half[1]) - pad[1]),
        min(shape[1], math.ceil(center[1] + half[1]) + pad[1]),
    )
    margin = resize_square(_margin_channel(norm, nodule, spacing, cfg, window), center, half, size, bilinear)

    # Location (CPDT) in the thyroid crop.
    thyroid_missing = thyroid is None
    capsule_mm: float | None = None
    position: float | None = None
    location = np.zeros((size, size), dtype=np.float32)
    if thyroid is not None:
        try:
            phi, _, capsule_mm = cpdt(thyroid, nodule, spacing)
        except ValueError as exc:
            notes.append(f"thyroid mask unusable for CPDT ({exc}): location channel left empty")
            thyroid_missing = True
            thyroid = None
        else:
            location = _location_channel(thyroid, nodule, phi, spacing, cfg)
            position = nodule_position_of(thyroid, nodule)
    else:
        notes.append("no thyroid mask: location channel empty, capsule distance unknown")

    # Scalars.
    r0, r1, c0, c1 = mask_bbox(nodule)
    shape_ratio = ((r1 - r0 + 1) * spacing[0]) / ((c1 - c0 + 1) * spacing[1])
    area = float(nodule.sum()) * spacing[0] * spacing[1]
    inside_mean = float(norm[nodule].mean())
    reference = None if thyroid is None else thyroid & ~nodule
    echo_reference = "thyroid"
    if reference is None or not reference.any():
        echo_reference = "ring"
        ring_pad = [math.ceil(cfg.echo_ring_mm / s) + 2 for s in spacing]
        rr0, rr1 = max(0, r0 - ring_pad[0]), min(shape[0], r1 + 1 + ring_pad[0])
        cc0, cc1 = max(0, c0 - ring_pad[1]), min(shape[1], c1 + 1 + ring_pad[1])
        sub = nodule[rr0:rr1, cc0:cc1]
        ring = ~sub & (ndimage.distance_transform_edt(~sub, sampling=spacing) <= cfg.echo_ring_mm)
        ref_values = norm[rr0:rr1, cc0:cc1][ring]
        if thyroid is not None:
            notes.append("nodule covers the whole thyroid mask: echogenicity measured against a ring")
        else:
            notes.append("echogenicity measured against a ring around the nodule (no thyroid mask)")
    else:
        ref_values = norm[reference]
    if ref_values.size == 0:
        # The nodule fills the frame: there is no surrounding tissue to compare with.
        echogenicity = 0.0
        notes.append("no tissue around the nodule inside the image: echogenicity set to 0")
    else:
        echogenicity = inside_mean - float(ref_values.mean())

    channels = np.stack([texture, margin, location]).astype(np.float32)
    np.clip(channels, 0.0, 1.0, out=channels)
    return ViewFeatures(
        channels=channels,
        shape_ratio=float(shape_ratio),
        echogenicity=float(echogenicity),
        capsule_distance_mm=capsule_mm,
        nodule_area_mm2=area,
        calibrated=calibrated,
        thyroid_missing=thyroid_missing,
        echo_reference=echo_reference,
        notes=tuple(notes),
        nodule_position=position,
    )
