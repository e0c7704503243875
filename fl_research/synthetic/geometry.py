"""3-D geometry of a thyroid lobe and its nodule, and the two ultrasound planes cut through them.

The lobe is a tapered ellipsoid: at craniocaudal position z its cross-section is an ellipse whose
semi-axes shrink towards the poles (the upper pole more sharply). The nodule is an ellipsoid (width,
antero-posterior depth, length) whose outline in each plane is perturbed according to its margin class.
The transverse plane cuts through the nodule centre at its z; the longitudinal plane cuts through the
nodule centre at its lateral position x, so both views show the same nodule at the same depth.

The nodule is placed so that, in the transverse plane, the smallest distance from its outline to the
capsule equals the sampled capsule distance (to 0.01 mm); the longitudinal plane is required to show
no smaller distance. The sampled distance is therefore what a measurement on the images gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

#: Craniocaudal position (u = 2 z / L, upper pole at -1) of each third: centres are drawn from these ranges.
THIRD_RANGES: dict[str, tuple[float, float]] = {
    "upper": (-0.85, -0.4),
    "middle": (-0.3, 0.3),
    "lower": (0.4, 0.85),
}
BOUNDARY_POINTS = 64


def lobe_profile(u: np.ndarray | float) -> np.ndarray:
    """Relative size of the lobe's cross-section at u = 2 z / L (upper pole -1, lower pole +1)."""
    u = np.clip(np.asarray(u, dtype=float), -1.0, 1.0)
    return (1.0 - u * u) ** 0.45 * (1.0 + 0.12 * u)


@dataclass(frozen=True)
class Outline:
    """A star-shaped 2-D outline: an ellipse (semi-axes ``ru`` along u, ``rv`` along v) times a radial
    perturbation ``1 + sum amp_k cos(k theta + phase_k)``, plus an optional bump (``bump_mm`` at angle
    ``bump_theta``) used for extrathyroidal extension."""

    ru: float
    rv: float
    harmonics: tuple[tuple[int, float, float], ...] = ()
    bump_theta: float = 0.0
    bump_mm: float = 0.0
    bump_width: float = 0.35

    def radius(self, theta: np.ndarray) -> np.ndarray:
        """Outline radius (mm) at polar angle ``theta`` around the centre."""
        theta = np.asarray(theta, dtype=float)
        base = self.ru * self.rv / np.sqrt((self.rv * np.cos(theta)) ** 2 + (self.ru * np.sin(theta)) ** 2)
        pert = np.ones_like(theta)
        for k, amp, phase in self.harmonics:
            pert = pert + amp * np.cos(k * theta + phase)
        r = base * np.maximum(pert, 0.3)
        if self.bump_mm > 0:
            d = np.angle(np.exp(1j * (theta - self.bump_theta)))
            r = r + self.bump_mm * np.exp(-0.5 * (d / self.bump_width) ** 2)
        return r

    def max_radius(self) -> float:
        """Upper bound of the outline radius (mm), for windowing."""
        return max(self.ru, self.rv) * (1.0 + sum(abs(a) for _, a, _ in self.harmonics)) + self.bump_mm

    def points(self, n: int = BOUNDARY_POINTS) -> np.ndarray:
        """``n`` outline points relative to the centre, shape (n, 2) as (u, v)."""
        theta = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
        r = self.radius(theta)
        return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)

    def inside(self, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
        """Boolean mask of points (offsets from the centre) inside the outline."""
        return np.hypot(du, dv) <= self.radius(np.arctan2(dv, du))

    def signed_depth(self, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm) to the outline along the ray from the centre (> 0 inside)."""
        return self.radius(np.arctan2(dv, du)) - np.hypot(du, dv)


def ellipse_signed_distance(points: np.ndarray, a: float, b: float, iters: int = 12) -> np.ndarray:
    """Exact signed distance (mm, > 0 inside) from points (N, 2) to the ellipse x²/a² + y²/b² = 1.

    Solves the standard one-dimensional root problem of the closest point with Newton's method started left
    of the root (the function is convex and decreasing there, so the iterates increase monotonically to
    it); distances used to place the nodule are exact, not limited by a polygon's resolution.
    """
    x = np.abs(points[:, 0])
    y = np.abs(points[:, 1])
    e0, e1 = (b, a) if a < b else (a, b)
    y0, y1 = (y, x) if a < b else (x, y)
    y0 = np.maximum(y0, 1e-9)
    y1 = np.maximum(y1, 1e-9)
    z0, z1 = y0 / e0, y1 / e1
    g = z0 * z0 + z1 * z1 - 1.0
    r0 = (e0 / e1) ** 2
    n0 = r0 * z0
    s = np.maximum(z1 - 1.0, n0 - r0)  # both are lower bounds of the root (each squared term is <= 1)
    for _ in range(iters):
        q0 = n0 / (s + r0)
        q1 = z1 / (s + 1.0)
        f = q0 * q0 + q1 * q1 - 1.0
        df = -2.0 * (q0 * q0 / (s + r0) + q1 * q1 / (s + 1.0))
        s = s - f / df
    x0 = r0 * y0 / (s + r0)
    x1 = y1 / (s + 1.0)
    dist = np.hypot(x0 - y0, x1 - y1)
    return np.where(g < 0, dist, -dist)


@dataclass(frozen=True)
class Lobe:
    """Thyroid lobe: half-width ``a``, half-depth ``b`` and length ``length`` (mm) at its widest."""

    a: float
    b: float
    length: float

    def section_axes(self, z: float) -> tuple[float, float]:
        """Semi-axes (lateral, depth) of the transverse cross-section at craniocaudal position z."""
        p = float(lobe_profile(2.0 * z / self.length))
        return self.a * p, self.b * p

    def half_depth_at(self, z: np.ndarray, x: float) -> np.ndarray:
        """Half-depth of the longitudinal section through lateral position x (0 outside the lobe)."""
        p = lobe_profile(2.0 * np.asarray(z, dtype=float) / self.length)
        ax, bx = self.a * p, self.b * p
        ratio = np.where(ax > 1e-9, (x / np.maximum(ax, 1e-9)) ** 2, 2.0)
        return np.where(ratio < 1.0, bx * np.sqrt(np.clip(1.0 - ratio, 0.0, None)), 0.0)

    def long_boundary(self, x: float, step_mm: float = 0.04) -> np.ndarray:
        """Closed outline (N, 2) of the longitudinal section at lateral x as (z, y), evenly spaced."""
        z = np.linspace(-self.length / 2, self.length / 2, 2001)
        h = self.half_depth_at(z, x)
        keep = h > 0
        z, h = z[keep], h[keep]
        poly = np.concatenate([np.stack([z, -h], 1), np.stack([z[::-1], h[::-1]], 1)])
        seg = np.hypot(*np.diff(poly, axis=0).T)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        s = np.arange(0.0, arc[-1], step_mm)
        return np.stack([np.interp(s, arc, poly[:, 0]), np.interp(s, arc, poly[:, 1])], 1)


def long_signed_distance(points: np.ndarray, lobe: Lobe, x: float) -> np.ndarray:
    """Signed distance (> 0 inside) from (z, y) points to the longitudinal section at lateral x.

    Nearest boundary point by k-d tree over the densely resampled outline (0.04 mm apart, so the error is
    below 0.001 mm for the distances that matter).
    """
    boundary = lobe.long_boundary(x)
    inside = np.abs(points[:, 1]) < lobe.half_depth_at(points[:, 0], x)
    if len(boundary) == 0:
        return np.full(len(points), -np.inf)
    d, _ = cKDTree(boundary).query(points)
    return np.where(inside, d, -d)


@dataclass(frozen=True)
class NoduleGeometry:
    """Where everything is, in the lobe's frame (mm): x lateral (0 = lobe axis, + = towards the image right
    in the transverse view), y depth (0 = lobe centre, + = deeper), z craniocaudal (- = upper)."""

    lobe: Lobe
    x: float
    y: float
    z: float
    trans: Outline  # in (x, y)
    long: Outline  # in (z, y)
    capsule_trans_mm: float  # achieved smallest outline-to-capsule distance, transverse plane
    capsule_long_mm: float  # same in the longitudinal plane (>= the transverse one)
    ete: bool
    tries: int


def margin_harmonics(margin: str, rng: np.random.Generator) -> tuple[tuple[int, float, float], ...]:
    """Radial perturbation of the outline for a margin class: near-elliptic for smooth and ill-defined,
    a few large low-order lobes for lobulated, many sharp high-order spikes for irregular / ETE."""
    terms: list[tuple[int, float, float]] = []

    def add(ks: list[int], lo: float, hi: float) -> None:
        for k in ks:
            terms.append((int(k), float(rng.uniform(lo, hi)), float(rng.uniform(0, 2 * np.pi))))

    if margin in ("smooth", "ill-defined"):
        add([2, 3], 0.0, 0.03)
    elif margin == "lobulated":
        add(sorted(rng.choice(np.arange(3, 7), size=2, replace=False).tolist()), 0.07, 0.12)
        add([2], 0.0, 0.04)
    elif margin in ("irregular", "extrathyroidal"):
        add([2, 3], 0.02, 0.06)
        add(sorted(rng.choice(np.arange(7, 19), size=6, replace=False).tolist()), 0.02, 0.05)
    else:
        raise ValueError(f"unknown margin class {margin!r}")
    return tuple(terms)


def place_nodule(
    *,
    width_mm: float,
    depth_mm: float,
    length_mm: float,
    capsule_mm: float,
    third: str,
    margin: str,
    rng: np.random.Generator,
    max_tries: int = 200,
) -> NoduleGeometry:
    """Build a lobe around the nodule and place the nodule at the sampled capsule distance and third.

    The lobe's size is drawn from an adult range and enlarged where the nodule would not fit (a large
    nodule expands its lobe); lobe size is not a risk feature, so this adds no dependence between features.
    """
    if third not in THIRD_RANGES:
        raise ValueError(f"unknown third {third!r}")
    ete = margin == "extrathyroidal"
    target = 0.0 if ete else float(capsule_mm)
    rw, rd, rl = width_mm / 2.0, depth_mm / 2.0, length_mm / 2.0
    lo, hi = THIRD_RANGES[third]
    u_mid = 0.5 * (lo + hi)
    p_mid = float(lobe_profile(u_mid))
    a = max(rng.uniform(7.0, 9.5), (rw * 1.15 + target + 1.0) / p_mid)
    b = max(rng.uniform(6.5, 9.0), (rd * 1.15 + target + 1.0) / p_mid)
    length = max(rng.uniform(40.0, 52.0), 2.0 * (rl * 1.15 + target + 1.0) / (1.0 - abs(u_mid) * 0.85))
    trans = Outline(rw, rd, margin_harmonics(margin, rng))
    long = Outline(rl, rd, margin_harmonics(margin, rng))
    trans_pts = trans.points()
    long_pts = long.points()
    for attempt in range(max_tries):
        if attempt and attempt % 12 == 0:  # the nodule does not fit well: grow the lobe
            a, b, length = a * 1.1, b * 1.1, length * 1.08
        lobe = Lobe(a, b, length)
        u = rng.uniform(lo, hi)
        z = u * length / 2.0
        ax, bx = lobe.section_axes(z)
        phi = rng.uniform(0.0, 2.0 * np.pi)
        direction = np.array([np.cos(phi), np.sin(phi)])
        t_max = max(ax, bx)
        t_grid = np.linspace(0.0, t_max, 12)
        f = _trans_distance(trans_pts, direction, t_grid, ax, bx)
        if f[0] < target:
            continue
        below = np.nonzero(f < target)[0]
        if len(below) == 0:
            continue
        k = below[0]
        t_lo, t_hi = t_grid[k - 1], t_grid[k]
        for _ in range(3):  # refine the first crossing (step shrinks 11x per round, to ~0.001 mm)
            t_grid = np.linspace(t_lo, t_hi, 12)
            f = _trans_distance(trans_pts, direction, t_grid, ax, bx)
            k = int(np.nonzero(f < target)[0][0]) if (f < target).any() else len(t_grid) - 1
            t_lo, t_hi = t_grid[max(k - 1, 0)], t_grid[k]
        t = t_lo
        cx, cy = t * direction
        d_trans = float(_trans_distance(trans_pts, direction, np.array([t]), ax, bx)[0])
        d_long = float(long_signed_distance(long_pts + np.array([z, cy]), lobe, cx).min())
        if d_long < target - 0.02 or abs(d_trans - target) > 0.02:
            continue
        if ete:  # break through the capsule where the nodule touches it
            sd = ellipse_signed_distance(trans_pts + np.array([cx, cy]), ax, bx)
            closest = trans_pts[int(np.argmin(sd))]
            bump = float(rng.uniform(1.0, 2.5))
            trans = Outline(rw, rd, trans.harmonics, float(np.arctan2(closest[1], closest[0])), bump)
            if d_long < 0.5:
                lsd = long_signed_distance(long_pts + np.array([z, cy]), lobe, cx)
                lclosest = long_pts[int(np.argmin(lsd))]
                long = Outline(rl, rd, long.harmonics, float(np.arctan2(lclosest[1], lclosest[0])), bump)
        return NoduleGeometry(
            lobe, float(cx), float(cy), float(z), trans, long, max(d_trans, 0.0), d_long, ete, attempt + 1
        )
    raise RuntimeError(
        f"could not place a {width_mm}x{depth_mm}x{length_mm} mm nodule at {capsule_mm} mm from the capsule "
        f"in the {third} third after {max_tries} tries"
    )


def _trans_distance(
    points: np.ndarray, direction: np.ndarray, t: np.ndarray, ax: float, bx: float
) -> np.ndarray:
    """Smallest signed outline-to-capsule distance for the nodule centred at t * direction (per t)."""
    shifted = points[None, :, :] + t[:, None, None] * direction[None, None, :]
    sd = ellipse_signed_distance(shifted.reshape(-1, 2), ax, bx)
    return sd.reshape(len(t), -1).min(1)
