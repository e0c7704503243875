"""B-mode-like rendering of the transverse and longitudinal thyroid views, and their masks.

Physics, simplified but in the right order: a tissue reflectivity map is built in millimetres (skin, fat,
strap muscles, trachea with reverberation and shadow, carotid and jugular, the lobe with its bright capsule,
the nodule with its echogenicity, margin, cystic parts and microcalcifications); it is multiplied by
fully developed speckle (the envelope of a complex Gaussian field blurred by the site's point-spread
function, i.e. Rayleigh statistics with a site-specific grain), attenuated with depth, log-compressed to
the site's dynamic range and gain, passed through a display gamma, and quantised with electronic noise.
Every step is vectorised numpy / scipy.ndimage: a view costs a few milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from .geometry import NoduleGeometry, Outline
from .profiles import ScannerProfile

#: Depth/zoom presets (multiples of the site's finest spacing) the sonographer picks from.
ZOOM_PRESETS: tuple[float, ...] = (1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.3, 2.65, 3.0, 3.5, 4.0, 5.0, 6.0)
PARENCHYMA = 0.6
ECHO_FACTOR = {"hyperechoic": 1.7, "isoechoic": 0.9, "hypoechoic": 0.3, "markedly hypoechoic": 0.1}
CYSTIC_FRACTION = {"solid": (0.0, 0.0), "predominantly solid": (0.1, 0.25), "mixed cystic-solid": (0.3, 0.55)}


@dataclass(frozen=True)
class NoduleLook:
    """What the nodule looks like (from the patient's truth)."""

    echogenicity: str
    composition: str
    margin: str
    microcalcifications: bool
    size_mm: float
    lobe: str  # right | left: decides on which side of the lobe the trachea appears (transverse view)


@dataclass(frozen=True)
class Layout:
    """Pixel layout of a captured frame: full size, the 2-D tissue region, and an optional Doppler strip."""

    rows: int
    cols: int
    region: tuple[int, int, int, int]  # r0, r1, c0, c1 (exclusive ends)
    doppler: tuple[int, int, int, int] | None


@dataclass
class RenderedView:
    """One rendered view: 8-bit grey frame, masks of the frame's size, and its calibration."""

    pixels: np.ndarray  # (rows, cols) uint8
    nodule_mask: np.ndarray  # (rows, cols) bool
    thyroid_mask: np.ndarray  # (rows, cols) bool
    spacing_mm: float
    layout: Layout


def frame_layout(image_size: int, scanner: ScannerProfile) -> Layout:
    """Frame size and regions of a site at a given ``--image-size`` (rows)."""
    rows = int(image_size)
    cols = round(image_size * scanner.aspect)
    r0 = round(scanner.border_top * rows)
    c0 = round(scanner.border_side * cols)
    c1 = cols - c0
    strip = round(scanner.doppler_strip * rows)
    r1 = rows - strip
    doppler = (r1 + 2, rows, c0, c1) if strip > 8 else None
    return Layout(rows, cols, (r0, r1, c0, c1), doppler)


def choose_spacing(need_w_mm: float, need_d_mm: float, layout: Layout, base_mm: float) -> float:
    """Finest preset spacing whose field of view holds the anatomy (else the exact spacing that does)."""
    r0, r1, c0, c1 = layout.region
    for zoom in ZOOM_PRESETS:
        sp = base_mm * zoom
        if (c1 - c0) * sp >= need_w_mm and (r1 - r0) * sp >= need_d_mm:
            return round(sp, 6)
    return round(max(need_w_mm / (c1 - c0), need_d_mm / (r1 - r0)) * 1.02, 6)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-sd smooth random field (texture, heterogeneity).

    Wide fields are drawn on a coarse grid and interpolated up, which keeps the cost independent of the
    correlation length (a direct Gaussian filter with sigma 25 px would dominate the render time).
    """
    if sigma_px <= 3.0:
        f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), max(sigma_px, 0.5))
    else:
        step = sigma_px / 2.0
        small = (int(np.ceil(shape[0] / step)) + 2, int(np.ceil(shape[1] / step)) + 2)
        g = ndimage.gaussian_filter(rng.standard_normal(small, dtype=np.float32), 2.0)
        f = _upsample(g, shape, step)
    sd = float(f.std())
    return f / sd if sd > 0 else f


def _upsample(g: np.ndarray, shape: tuple[int, int], step: float) -> np.ndarray:
    """Separable linear interpolation of a coarse grid (spacing ``step`` px) onto ``shape``."""
    out = g
    for axis, n in enumerate(shape):
        pos = (np.arange(n, dtype=np.float32) + 0.5) / step
        i0 = np.clip(np.floor(pos).astype(int), 0, g.shape[axis] - 2)
        w = (pos - i0).astype(np.float32)
        a = np.take(out, i0, axis=axis)
        b = np.take(out, i0 + 1, axis=axis)
        wshape = [1, 1]
        wshape[axis] = n
        w = w.reshape(wshape)
        out = a * (1.0 - w) + b * w
    return out


@dataclass(frozen=True)
class Anatomy:
    """Per-patient soft-tissue layout shared by both views (mm)."""

    skin: float
    fat: float
    muscle: float
    lobe_centre_depth: float
    diffuse_disease: bool
    trachea_radius: float
    carotid_radius: float
    vessel_gap: float

    @property
    def muscle_bottom(self) -> float:
        return self.skin + self.fat + self.muscle


def draw_anatomy(geom: NoduleGeometry, rng: np.random.Generator) -> Anatomy:
    """Draw the soft-tissue layout above and beside the lobe."""
    skin = float(rng.uniform(0.6, 1.0))
    fat = float(rng.uniform(1.5, 4.0))
    muscle = float(rng.uniform(2.0, 4.5))
    return Anatomy(
        skin,
        fat,
        muscle,
        skin + fat + muscle + 0.6 + geom.lobe.b,
        bool(rng.random() < 0.15),
        float(rng.uniform(8.0, 10.0)),
        float(rng.uniform(3.0, 4.0)),
        float(rng.uniform(0.5, 2.0)),
    )


def needed_field(geom: NoduleGeometry, anat: Anatomy, view: str) -> tuple[float, float]:
    """Width and depth (mm) the view must show: the whole lobe section with a margin."""
    depth = anat.lobe_centre_depth + geom.lobe.b + 3.0
    if view == "trans":
        ax, _ = geom.lobe.section_axes(geom.z)
        return 2.0 * ax + 2.0 * geom.trans.bump_mm + 0.8 * anat.trachea_radius + 5.0, depth
    boundary = geom.lobe.long_boundary(geom.x)
    return float(np.ptp(boundary[:, 0])) + 6.0, depth


def render_view(
    view: str,
    geom: NoduleGeometry,
    anat: Anatomy,
    look: NoduleLook,
    scanner: ScannerProfile,
    layout: Layout,
    base_spacing_mm: float,
    rng: np.random.Generator,
) -> RenderedView:
    """Render one view ("trans" or "long") of a patient into a frame of the site's layout."""
    if view not in ("trans", "long"):
        raise ValueError(f"unknown view {view!r}")
    need_w, need_d = needed_field(geom, anat, view)
    sp = choose_spacing(need_w, need_d, layout, base_spacing_mm)
    r0, r1, c0, c1 = layout.region
    nr, nc = r1 - r0, c1 - c0
    width_mm = nc * sp
    medial = 1.0 if look.lobe == "right" else -1.0
    # centre of the field of view in the scene: the lobe, shifted towards the trachea in the transverse view
    centre = medial * (0.8 * anat.trachea_radius - 1.0) / 2.0 if view == "trans" else 0.0
    free = max(width_mm - need_w, 0.0)
    centre += float(rng.uniform(-0.3, 0.3)) * free
    y = ((np.arange(nr, dtype=np.float32) + 0.5) * sp)[:, None]
    h = ((np.arange(nc, dtype=np.float32) + 0.5) * sp - width_mm / 2.0 + centre)[None, :]
    yy = np.broadcast_to(y, (nr, nc))
    hh = np.broadcast_to(h, (nr, nc))
    yl = yy - anat.lobe_centre_depth  # depth relative to the lobe centre

    tissue = 0.2 * np.exp(0.15 * _smooth_field(rng, (nr, nc), 2.5 / sp))
    _soft_tissue_layers(tissue, yy, hh, anat, sp, rng)
    if view == "trans":
        ax, bx = geom.lobe.section_axes(geom.z)
        _neck_structures(tissue, yy, hh, yl, anat, ax, bx, medial, sp, rng)
        g = (hh / ax) ** 2 + (yl / bx) ** 2 - 1.0
        grad = 2.0 * np.sqrt((hh / ax**2) ** 2 + (yl / bx**2) ** 2) + 1e-6
        lobe_sd = -g / grad  # signed distance to the capsule, > 0 inside (first order, exact on the capsule)
        lobe_in = g <= 0.0
        outline = geom.trans
    else:
        half = geom.lobe.half_depth_at(hh, geom.x).astype(np.float32)
        dh = np.gradient(geom.lobe.half_depth_at(h[0], geom.x).astype(np.float32), sp)[None, :]
        lobe_sd = (half - np.abs(yl)) / np.sqrt(1.0 + dh**2)
        lobe_in = np.abs(yl) < half
        _deep_structures(tissue, yy, hh, yl, anat, geom, sp)
        outline = geom.long

    # lobe parenchyma, its heterogeneity, and the bright capsule
    paren = PARENCHYMA * (1.0 + 0.08 * _smooth_field(rng, (nr, nc), 0.6 / sp))
    if anat.diffuse_disease:  # patchy hypoechoic parenchyma (thyroiditis): a nuisance, unrelated to LLNM
        patches = _smooth_field(rng, (nr, nc), 1.5 / sp)
        paren = paren * np.exp(-0.4 * np.clip(patches, 0.0, None))
    tissue = np.where(lobe_in, paren, tissue)
    tissue = tissue + 0.7 * np.exp(-0.5 * (lobe_sd / 0.15) ** 2)

    # the nodule, computed in a window around it (its outline is costly to evaluate on the whole frame)
    cu = geom.x if view == "trans" else geom.z
    reach = outline.max_radius() + 1.5
    rows = np.nonzero(np.abs(y[:, 0] - anat.lobe_centre_depth - geom.y) <= reach)[0]
    cols = np.nonzero(np.abs(h[0, :] - cu) <= reach)[0]
    if len(rows) == 0 or len(cols) == 0:
        raise RuntimeError(f"{view} view: the nodule lies outside the field of view (spacing {sp} mm)")
    win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    wshape = (len(rows), len(cols))
    du_w = np.broadcast_to(h[:, win[1]] - cu, wshape)
    dv_w = np.broadcast_to(y[win[0], :] - anat.lobe_centre_depth - geom.y, wshape)
    depth_in = outline.signed_depth(du_w, dv_w).astype(np.float32)
    nodule_win = depth_in >= 0.0
    if look.margin == "ill-defined":
        blur = 0.35 * (1.0 + 0.6 * np.clip(_smooth_field(rng, wshape, 1.0 / sp), -1, 1))
        weight = special.expit(depth_in / np.maximum(blur, 0.1)).astype(np.float32)
    else:
        weight = special.expit(depth_in / 0.06).astype(np.float32)
    nod = PARENCHYMA * ECHO_FACTOR[look.echogenicity] * np.exp(0.2 * _smooth_field(rng, wshape, 0.35 / sp))
    if look.echogenicity in ("isoechoic", "hyperechoic"):  # thin hypoechoic halo around iso/hyper nodules
        nod = np.where((depth_in >= 0) & (depth_in < 0.45), 0.15, nod)
    lo_frac, hi_frac = CYSTIC_FRACTION[look.composition]
    if hi_frac > 0:
        frac = float(rng.uniform(lo_frac, hi_frac))
        field = _smooth_field(rng, wshape, 0.8 / sp)
        core = depth_in > 0.6
        if core.any():
            cut = np.quantile(field[core], 1.0 - frac)
            nod = np.where(core & (field > cut), 0.02, nod)
            # posterior acoustic enhancement behind a partly cystic nodule
            under = np.abs(h[0, win[1]] - cu) < 0.8 * outline.ru
            below = slice(rows[-1] + 1, nr)
            tissue[below, win[1]] = np.where(
                under[None, :], tissue[below, win[1]] * (1.0 + 0.5 * frac), tissue[below, win[1]]
            )
    patch = tissue[win] * (1.0 - weight) + nod * weight
    if look.microcalcifications:
        patch = patch + _microcalcifications(depth_in, look.size_mm, sp, rng)
    tissue[win] = patch
    nodule_in = np.zeros((nr, nc), dtype=bool)
    nodule_in[win] = nodule_win

    pixels = _bmode(np.clip(tissue, 0.0, None).astype(np.float32), y, scanner, sp, rng)
    frame = np.zeros((layout.rows, layout.cols), dtype=np.uint8)
    frame[r0:r1, c0:c1] = pixels
    _annotations(frame, layout, sp, rng)
    nodule_mask = np.zeros_like(frame, dtype=bool)
    thyroid_mask = np.zeros_like(frame, dtype=bool)
    nodule_mask[r0:r1, c0:c1] = nodule_in
    thyroid_mask[r0:r1, c0:c1] = lobe_in
    return RenderedView(frame, nodule_mask, thyroid_mask, sp, layout)


def _soft_tissue_layers(
    tissue: np.ndarray, yy: np.ndarray, hh: np.ndarray, anat: Anatomy, sp: float, rng: np.random.Generator
) -> None:
    """Skin line, subcutaneous fat with septa, strap muscles with fibre striation (in place)."""
    fat_top, muscle_top, muscle_bottom = anat.skin, anat.skin + anat.fat, anat.muscle_bottom
    tissue[yy < fat_top] = 0.8
    fat = (yy >= fat_top) & (yy < muscle_top)
    tissue[fat] = 0.14
    for _ in range(int(rng.integers(1, 4))):  # fibrous septa in the fat
        yk = float(rng.uniform(fat_top, muscle_top))
        slope = float(rng.uniform(-0.05, 0.05))
        septum = fat & (np.abs(yy - yk - slope * hh) < 0.12)
        tissue[septum] = 0.4
    muscle = (yy >= muscle_top) & (yy < muscle_bottom)
    period = float(rng.uniform(0.6, 1.0))
    stri = np.sin(2 * np.pi * (yy + 0.25 * np.sin(hh / 6.0)) / period)
    tissue[muscle] = (0.11 * (1.0 + 0.8 * (stri > 0.6)))[muscle]
    fascia = np.abs(yy - muscle_bottom) < 0.15
    tissue[fascia] = 0.45


def _neck_structures(
    tissue: np.ndarray,
    yy: np.ndarray,
    hh: np.ndarray,
    yl: np.ndarray,
    anat: Anatomy,
    ax: float,
    bx: float,
    medial: float,
    sp: float,
    rng: np.random.Generator,
) -> None:
    """Trachea (air: bright anterior wall, reverberations, shadow), carotid and jugular (in place)."""
    rt = anat.trachea_radius
    xt = medial * (ax + 0.8 * rt)
    yt = 0.15 * bx
    rho = np.hypot(hh - xt, yl - yt)
    inside = rho < rt
    front = yl < yt
    tissue[inside & front & (rho > rt - 1.2)] = 0.16  # cartilage ring
    wall = inside & front & (rho > rt - 1.5) & (rho <= rt - 1.2)
    tissue[wall] = 1.4  # air-mucosa interface
    air = (np.abs(hh - xt) < 0.92 * rt) & (
        yl > yt - np.sqrt(np.clip((rt - 1.5) ** 2 - (hh - xt) ** 2, 0, None))
    )
    tissue[air] = 0.02
    wall_depth = yt - (rt - 1.35)
    for k in range(1, 5):  # reverberation artefacts at multiples of the wall depth
        band = air & (np.abs((yl - wall_depth) - k * 1.6) < 0.15)
        tissue[band] = 0.9 * 0.55**k
    rc = anat.carotid_radius
    xc = -medial * (ax + rc + anat.vessel_gap)
    ycar = 0.35 * bx
    rho_c = np.hypot(hh - xc, yl - ycar)
    tissue[(rho_c >= rc) & (rho_c < rc + 0.45)] = 0.6
    tissue[rho_c < rc] = 0.015
    enhance = (np.abs(hh - xc) < rc) & (yl > ycar + rc + 0.45)
    tissue[enhance] *= 1.35
    xj = xc - medial * (rc + float(rng.uniform(3.0, 5.0)))
    yj = ycar - float(rng.uniform(1.0, 2.5))
    ej = ((hh - xj) / float(rng.uniform(3.0, 5.0))) ** 2 + ((yl - yj) / float(rng.uniform(1.5, 2.8))) ** 2
    tissue[(ej >= 1.0) & (ej < 1.12)] = 0.6
    tissue[ej < 1.0] = 0.02


def _deep_structures(
    tissue: np.ndarray,
    yy: np.ndarray,
    hh: np.ndarray,
    yl: np.ndarray,
    anat: Anatomy,
    geom: NoduleGeometry,
    sp: float,
) -> None:
    """Longitudinal view: longus colli muscle behind the lobe and a bright prevertebral line (in place)."""
    band = (yl > geom.lobe.b + 0.8) & (yl < geom.lobe.b + 4.0)
    tissue[band] = 0.11
    line = np.abs(yl - (geom.lobe.b + 4.2)) < 0.2
    tissue[line] = 0.9
    tissue[yl > geom.lobe.b + 4.4] *= 0.5


def _microcalcifications(
    depth_in: np.ndarray, size_mm: float, sp: float, rng: np.random.Generator
) -> np.ndarray:
    """Punctate bright foci (0.1-0.3 mm) scattered inside the nodule."""
    out = np.zeros(depth_in.shape, dtype=np.float32)
    candidates = np.flatnonzero(depth_in.ravel() > 0.25)
    if len(candidates) == 0:
        return out
    count = int(np.clip(round(size_mm * rng.uniform(0.6, 1.3)), 3, 30))
    picks = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
    np.add.at(out.ravel(), picks, rng.uniform(4.0, 7.0, len(picks)).astype(np.float32))
    sigma = max(0.12 / sp, 0.5)
    return ndimage.gaussian_filter(out, sigma) * (2.0 * np.pi * sigma * sigma)


def _bmode(
    tissue: np.ndarray, y: np.ndarray, scanner: ScannerProfile, sp: float, rng: np.random.Generator
) -> np.ndarray:
    """Speckle, attenuation, log compression, display curve and noise: reflectivity -> 8-bit B-mode.

    ``y`` is the depth (mm) of each row, shape (rows, 1). Speckle is the envelope of a complex Gaussian field
    blurred by the point-spread function (Rayleigh amplitude); sites with spatial compounding average the
    intensity of several independent looks (gamma-distributed intensity, fewer dark speckle nulls).
    """
    sa = max(scanner.speckle_axial_mm / sp, 0.5)
    sl = max(scanner.speckle_lateral_mm / sp, 0.5)
    shape = tissue.shape
    blurred = ndimage.gaussian_filter(tissue, (0.5 * sa, 0.5 * sl))
    intensity = np.zeros(shape, dtype=np.float32)
    for _ in range(max(scanner.compounding, 1)):
        re = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (sa, sl), truncate=3.0)
        im = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (sa, sl), truncate=3.0)
        intensity += re * re + im * im
    intensity /= float(intensity.mean()) + 1e-12
    # amplitude in dB: reflectivity x speckle envelope, minus depth attenuation left after TGC
    db = (
        20.0 * np.log10(blurred + 1e-4)
        + 10.0 * np.log10(intensity + 1e-8)
        - (scanner.attenuation_db_per_mm * y).astype(np.float32)
    )
    top = 6.0 - scanner.gain_db
    v = np.clip((db - (top - scanner.dynamic_range_db)) / scanner.dynamic_range_db, 0.0, 1.0)
    if scanner.gamma != 1.0:
        v = v**scanner.gamma
    grey = 255.0 * v + scanner.noise_grey * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _annotations(frame: np.ndarray, layout: Layout, sp: float, rng: np.random.Generator) -> None:
    """Depth-scale dots beside the tissue region and a spectral Doppler strip where the site has one."""
    r0, r1, c0, _ = layout.region
    if c0 >= 4:
        step = max(round(5.0 / sp), 2)
        for r in range(r0, r1, step):
            frame[r : r + 2, c0 - 3 : c0 - 1] = 200
    if layout.doppler is not None:
        d0, d1, e0, e1 = layout.doppler
        nrow, ncol = d1 - d0, e1 - e0
        base = int(nrow * 0.7)
        t = np.arange(ncol, dtype=np.float32)
        period = float(rng.uniform(0.28, 0.4)) * ncol
        phase = (t + float(rng.uniform(0, period))) % period / period
        env = (
            0.25
            + 0.75 * np.exp(-(((phase - 0.1) / 0.08) ** 2))
            + 0.15 * np.exp(-(((phase - 0.35) / 0.06) ** 2))
        )
        top = base - env * (base - 2)
        rr = np.arange(nrow, dtype=np.float32)[:, None]
        filled = (rr >= top[None, :]) & (rr < base)
        speck = rng.gamma(2.0, 60.0, (nrow, ncol)).astype(np.float32)
        strip = np.where(filled, np.clip(speck, 0, 255), 0.0)
        strip[base, :] = 140
        frame[d0:d1, e0:e1] = strip.astype(np.uint8)


def tint_rgb(pixels: np.ndarray, tint: tuple[float, float, float]) -> np.ndarray:
    """Colour display of an RGB site (grey times a per-channel tint), shape (rows, cols, 3) uint8."""
    rgb = pixels[..., None].astype(np.float32) * np.asarray(tint, dtype=np.float32)[None, None, :]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


__all__ = [
    "Anatomy",
    "Layout",
    "NoduleLook",
    "Outline",
    "RenderedView",
    "draw_anatomy",
    "frame_layout",
    "render_view",
    "tint_rgb",
]
