"""Consortia of more than seven sites: seeded variants of the seven hospitals and a drawn site-size layout.

The seven hand-written profiles (:data:`~fl_research.synthetic.profiles.SITE_PROFILES`) stay the first seven
sites, unchanged, so a consortium of up to seven sites is byte-identical to what it always was. Site ``k`` > 7 is
named ``site-NNN`` and is a variant of profile ``(k - 1) mod 7``: the same kind of hospital (role, report
dialect, scanner vendor and DICOM encoding) with its case mix and scanner settings drawn around that hospital's
(prevalence, sex ratio, age, nodule size, missing data, gain, noise, pixel size), from a generator seeded by the
consortium seed and ``k``.

Site sizes for more than seven sites are drawn too: log-normal weights (sigma :data:`SIZE_SIGMA`, seeded),
sorted so that site-a stays the largest, then scaled to the total like the fixed layouts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .profiles import REPORT_MENTION_SCALE, SITE_PROFILES, SiteProfile, layout_proportions, with_mention_scale

#: Most sites a consortium may have (three-digit site names).
MAX_SITES = 999
#: Spread of the drawn site sizes: log-normal sigma (0.8: the largest of 100 sites is about 20x the smallest).
SIZE_SIGMA = 0.8


def consortium_profiles(n_sites: int, seed: int, profile: str = "default") -> tuple[SiteProfile, ...]:
    """The ``n_sites`` site profiles: the seven hospitals, then seeded variants of them, as ``--profile``
    ``profile`` has them report."""
    if not 1 <= n_sites <= MAX_SITES:
        raise ValueError(f"--sites must be between 1 and {MAX_SITES}, got {n_sites}")
    base = SITE_PROFILES[: min(n_sites, len(SITE_PROFILES))]
    extra = tuple(_variant(k, SITE_PROFILES[(k - 1) % len(SITE_PROFILES)], seed)
                  for k in range(len(SITE_PROFILES) + 1, n_sites + 1))
    factor = REPORT_MENTION_SCALE.get(profile, 1.0)
    return tuple(with_mention_scale(p, factor) for p in base + extra)


def consortium_proportions(layout: str, n_sites: int, seed: int) -> tuple[float, ...]:
    """Site-size proportions: the named layout for up to seven sites, else drawn (seeded) for all of them."""
    fixed = layout_proportions(layout)
    if n_sites <= len(fixed):
        return fixed
    if layout != "default":
        raise ValueError(f"--profile {layout} describes {len(fixed)} sites; more sites use drawn sizes "
                         "(--profile default)")
    weights = np.sort(np.random.default_rng([seed, 104729]).lognormal(0.0, SIZE_SIGMA, n_sites))[::-1]
    return tuple(float(w) for w in weights / weights.sum())


def dialect_of(profile: SiteProfile) -> str:
    """The hand-written hospital whose report dialect a site uses (itself, or the one it varies)."""
    return str(profile.extra.get("variant_of", profile.name))


def patient_prefix(profile: SiteProfile) -> str:
    """The patient-id prefix of a site: ``PA`` for site-a, ``P008`` for site-008."""
    tag = profile.name.removeprefix("site-")
    return f"P{tag.upper()}"


def _variant(k: int, base: SiteProfile, seed: int) -> SiteProfile:
    rng = np.random.default_rng([seed, k, 7919])

    def scaled(value: float, low: float, high: float) -> float:
        return float(value * rng.uniform(low, high))

    scanner = dataclasses.replace(
        base.scanner,
        base_spacing_mm=round(scaled(base.scanner.base_spacing_mm, 0.9, 1.1), 4),
        gain_db=round(base.scanner.gain_db + float(rng.normal(0.0, 2.0)), 2),
        noise_grey=round(scaled(base.scanner.noise_grey, 0.8, 1.25), 3),
    )
    return dataclasses.replace(
        base,
        name=f"site-{k:03d}",
        description=f"{base.description} (variant {k} of {base.name})",
        institution=f"Synthetic Hospital {k:03d}",
        target_prevalence=round(float(np.clip(scaled(base.target_prevalence, 0.8, 1.25), 0.12, 0.70)), 3),
        male_prob=round(float(np.clip(base.male_prob + rng.normal(0.0, 0.04), 0.1, 0.6)), 3),
        age_mean=round(base.age_mean + float(rng.normal(0.0, 2.5)), 1),
        size_median_mm=round(scaled(base.size_median_mm, 0.85, 1.2), 2),
        missing_report_prob=round(float(np.clip(scaled(base.missing_report_prob, 0.5, 2.0), 0.0, 0.3)), 3),
        missing_view_prob=round(float(np.clip(scaled(base.missing_view_prob, 0.5, 2.0), 0.0, 0.3)), 3),
        scanner=scanner,
        extra={**base.extra, "variant_of": base.name},
    )
