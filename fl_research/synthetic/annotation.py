"""Partial annotation: which patients of a synthetic consortium have drawn masks (`llnm-synth --drawn-masks`).

No real consortium has hand-drawn masks for every patient: hospitals annotate some and let a segmenter do the rest.
A consortium can mimic that: a fraction of the patients at some sites keep their masks in the site folder; for the
others the mask cells of `patients.csv` are empty and the masks (the generator's real ones) move to
``OUT/truth/masks/<site>/``, where no site reads them and a benchmark scores predicted masks against them.

Who keeps masks is drawn from its own random stream (``[seed, site, 3]``), so the images, reports and labels of a
consortium are the same whatever the annotation options.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Annotation", "drawn_patients", "withhold_masks"]


@dataclass(frozen=True)
class Annotation:
    """What is drawn: `fraction` of the patients (rounded) at each site in `sites` (None: every site)."""

    fraction: float = 1.0
    sites: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"drawn_masks must be a fraction from 0 to 1, got {self.fraction!r}")

    @property
    def complete(self) -> bool:
        return self.fraction == 1.0 and self.sites is None

    def check_sites(self, names: Sequence[str]) -> None:
        """Refuse a site name the consortium does not have."""
        unknown = sorted(set(self.sites or ()) - set(names))
        if unknown:
            raise ValueError(f"drawn_masks_sites names {unknown}, which the consortium does not have "
                             f"(its sites: {', '.join(names)})")

    def to_dict(self) -> dict[str, object]:
        return {"fraction": self.fraction, "sites": list(self.sites) if self.sites is not None else "all"}


def drawn_patients(annotation: Annotation, site: str, n: int, seed: int, site_index: int) -> np.ndarray:
    """Which of a site's `n` patients keep their drawn masks (boolean, in table order)."""
    if annotation.complete:
        return np.ones(n, dtype=bool)
    drawn = np.zeros(n, dtype=bool)
    if annotation.sites is not None and site not in annotation.sites:
        return drawn
    rng = np.random.default_rng([seed, site_index, 3])
    drawn[rng.permutation(n)[: round(annotation.fraction * n)]] = True
    return drawn


def withhold_masks(site_dir: Path, truth_dir: Path, patient_ids: Sequence[str], drawn: np.ndarray) -> int:
    """Move the masks of the patients not drawn from the site's ``masks/`` to ``truth_dir``; returns how many
    files moved."""
    moved = 0
    for pid, keep in zip(patient_ids, drawn, strict=True):
        if keep:
            continue
        for path in sorted((site_dir / "masks").glob(f"{pid}_*.png")):
            truth_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), truth_dir / path.name)
            moved += 1
    return moved
