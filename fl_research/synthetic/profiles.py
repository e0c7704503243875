"""The seven synthetic hospitals: case mix, scanner, DICOM encoding and report style.

Everything that makes one site differ from another lives here, as plain frozen dataclasses, so that the
whole description can be written to ``consortium.json`` and a reader can see exactly which non-IID effects
a federated model faces: site size, prevalence (via the site intercept), case mix, scanner physics,
DICOM encoding quirks and reporting habits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

#: Share of the consortium's patients per site. Two large development hospitals and five smaller external
#: ones, as in the paper (29,615 development vs 9,836 external patients from 2 + 5 hospitals).
SITE_PROPORTIONS: tuple[float, ...] = (0.30, 0.22, 0.15, 0.11, 0.09, 0.07, 0.06)

#: The paper's layout (``llnm-synth --profile paper``): the two development hospitals hold 75% of all
#: patients (29,615 of 39,451) and the five external hospitals share the other 25% (9,836). With the site
#: prevalences below the pooled LLNM prevalence comes out near the paper's 52%.
PAPER_PROPORTIONS: tuple[float, ...] = (0.43, 0.32, 0.07, 0.06, 0.05, 0.04, 0.03)

#: Site-size layouts by ``--profile`` name. ``paper-calibrated`` has the paper's layout; what else it changes
#: is its risk function (``risk_model.RISK_MODELS``) and its reports (:data:`REPORT_MENTION_SCALE`).
LAYOUTS: dict[str, tuple[float, ...]] = {
    "default": SITE_PROPORTIONS,
    "paper": PAPER_PROPORTIONS,
    "paper-calibrated": PAPER_PROPORTIONS,
}

#: Profiles whose reports say less than the sites' own habits: every finding's mention probability is multiplied
#: by this factor. Preoperative reports describe a nodule briefly and never measure its distance to the capsule;
#: halving the mentions keeps the report from restating what the images show, so that a model has to read
#: morphology and location from the images, as the paper's attribution says LLNM-Net does. The report-only
#: lymph-node finding is always written when present, whatever the factor.
REPORT_MENTION_SCALE: dict[str, float] = {"paper-calibrated": 0.5}

#: Profiles whose ``--patients`` defaults to the paper's cohort size.
PAPER_SIZED_PROFILES: frozenset[str] = frozenset({"paper", "paper-calibrated"})

#: The paper's total number of patients: the default ``--patients`` of ``--profile paper``.
PAPER_PATIENTS = 39_451

#: Fewest patients any site may get, so every site can be split train/val/test with both classes.
MIN_PATIENTS_PER_SITE = 8


@dataclass(frozen=True)
class ScannerProfile:
    """Acquisition and display settings of a site's ultrasound system.

    Spacing is the finest pixel size at the reference image size of 256 rows; the sonographer zooms out
    (multiplies it by a preset factor) when the anatomy does not fit, as one changes the depth setting.
    """

    manufacturer: str
    model: str
    base_spacing_mm: float  # at --image-size 256; scales with 256 / image_size
    aspect: float  # columns / rows of the captured frame
    gain_db: float  # brightness offset of the log-compressed image
    dynamic_range_db: float  # displayed dynamic range
    gamma: float  # display curve exponent (< 1 brightens mid-greys)
    speckle_axial_mm: float  # speckle grain size along the beam (rows)
    speckle_lateral_mm: float  # speckle grain size across the beam (columns)
    attenuation_db_per_mm: float  # tissue attenuation left after time-gain compensation
    noise_grey: float  # electronic noise, grey levels (sd)
    compounding: int = 1  # looks averaged by spatial compounding (1 = none)
    border_top: float = 0.0  # black margins around the tissue region, as fractions of the frame
    border_side: float = 0.0
    doppler_strip: float = 0.0  # fraction of rows used by a spectral Doppler strip at the bottom
    transfer_syntax: str = "explicit"  # explicit | implicit | rle
    photometric: str = "MONOCHROME2"  # MONOCHROME2 | RGB
    negative_delta_x: bool = False  # store PhysicalDeltaX negative, as some vendors do
    non_spatial_region: bool = False  # add a non-spatial (format 0) region before the tissue region
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # colour map of an RGB site (sepia-like display)


@dataclass(frozen=True)
class ReportStyle:
    """How a site's radiologists write: probability each finding is mentioned, typo rate, and layout.

    A finding is mentioned independently of its value (so an omission carries no information), except the
    report-only lymph-node finding which is always written when present.
    """

    mention: dict[str, float]
    typo_rate: float  # per eligible word (>= 5 letters)
    node_negative_prob: float  # chance of an explicit "no suspicious lateral nodes" sentence when absent
    units: str  # "mm" or "cm"
    dims: str  # "three" (W x AP x L), "three_lwd" (L x W x AP), "max" (largest diameter only)


@dataclass(frozen=True)
class SiteProfile:
    """One hospital of the synthetic consortium."""

    name: str
    role: str  # development | external
    description: str
    institution: str
    target_prevalence: float  # the site intercept is calibrated so that E[risk] equals this
    male_prob: float
    age_mean: float
    age_sd: float
    size_median_mm: float
    capsule_scale_mm: float  # scale of the gamma distribution of capsule distance (non-ETE nodules)
    node_finding_prob: float  # prevalence of the report-only lymph-node finding
    missing_report_prob: float
    missing_view_prob: float  # per patient: one of the two views is missing
    scanner: ScannerProfile
    report: ReportStyle
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (tuples become lists)."""
        return asdict(self)


def _mention(**values: float) -> dict[str, float]:
    keys = ("location", "size", "composition", "echogenicity", "margin", "calcification", "shape")
    missing = set(keys) - set(values)
    if missing:
        raise ValueError(f"report style lacks mention probabilities for {sorted(missing)}")
    return {k: float(values[k]) for k in keys}


SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="site-a",
        role="development",
        description="Large university hospital, thyroid centre",
        institution="Synthetic University Hospital A",
        target_prevalence=0.50,
        male_prob=0.29,
        age_mean=43.0,
        age_sd=13.0,
        size_median_mm=6.4,
        capsule_scale_mm=2.6,
        node_finding_prob=0.10,
        missing_report_prob=0.02,
        missing_view_prob=0.02,
        scanner=ScannerProfile(
            manufacturer="GE Healthcare",
            model="LOGIQ E10",
            base_spacing_mm=0.10,
            aspect=1.25,
            gain_db=2.0,
            dynamic_range_db=50.0,
            gamma=1.0,
            speckle_axial_mm=0.16,
            speckle_lateral_mm=0.30,
            attenuation_db_per_mm=0.08,
            noise_grey=1.5,
            border_top=0.04,
            border_side=0.02,
        ),
        report=ReportStyle(
            mention=_mention(
                location=0.97,
                size=0.95,
                composition=0.85,
                echogenicity=0.9,
                margin=0.85,
                calcification=0.8,
                shape=0.7,
            ),
            typo_rate=0.004,
            node_negative_prob=0.7,
            units="mm",
            dims="three",
        ),
    ),
    SiteProfile(
        name="site-b",
        role="development",
        description="Large regional hospital, head and neck surgery",
        institution="Synthetic Regional Hospital B",
        target_prevalence=0.55,
        male_prob=0.31,
        age_mean=43.5,
        age_sd=12.5,
        size_median_mm=6.2,
        capsule_scale_mm=2.5,
        node_finding_prob=0.12,
        missing_report_prob=0.03,
        missing_view_prob=0.02,
        scanner=ScannerProfile(
            manufacturer="Philips",
            model="EPIQ 7G",
            base_spacing_mm=0.085,
            aspect=1.33,
            gain_db=-1.0,
            dynamic_range_db=46.0,
            gamma=0.85,
            speckle_axial_mm=0.14,
            speckle_lateral_mm=0.26,
            attenuation_db_per_mm=0.10,
            noise_grey=1.0,
            compounding=2,
            transfer_syntax="implicit",
        ),
        report=ReportStyle(
            mention=_mention(
                location=0.95,
                size=0.9,
                composition=0.6,
                echogenicity=0.85,
                margin=0.75,
                calcification=0.75,
                shape=0.5,
            ),
            typo_rate=0.01,
            node_negative_prob=0.4,
            units="mm",
            dims="max",
        ),
    ),
    SiteProfile(
        name="site-c",
        role="external",
        description="City hospital, general radiology",
        institution="Synthetic City Hospital C",
        target_prevalence=0.62,
        male_prob=0.22,
        age_mean=44.5,
        age_sd=11.5,
        size_median_mm=8.0,
        capsule_scale_mm=2.3,
        node_finding_prob=0.13,
        missing_report_prob=0.02,
        missing_view_prob=0.03,
        scanner=ScannerProfile(
            manufacturer="SIEMENS",
            model="ACUSON Sequoia",
            base_spacing_mm=0.12,
            aspect=1.25,
            gain_db=4.0,
            dynamic_range_db=55.0,
            gamma=1.15,
            speckle_axial_mm=0.20,
            speckle_lateral_mm=0.38,
            attenuation_db_per_mm=0.06,
            noise_grey=2.0,
            border_top=0.08,
            border_side=0.04,
            negative_delta_x=True,
            non_spatial_region=True,
        ),
        report=ReportStyle(
            mention=_mention(
                location=0.9,
                size=0.9,
                composition=0.7,
                echogenicity=0.8,
                margin=0.8,
                calcification=0.85,
                shape=0.8,
            ),
            typo_rate=0.006,
            node_negative_prob=0.8,
            units="cm",
            dims="three_lwd",
        ),
    ),
    SiteProfile(
        name="site-d",
        role="external",
        description="Provincial hospital, ultrasound department",
        institution="Synthetic Provincial Hospital D",
        target_prevalence=0.45,
        male_prob=0.20,
        age_mean=45.0,
        age_sd=11.0,
        size_median_mm=8.4,
        capsule_scale_mm=2.8,
        node_finding_prob=0.08,
        missing_report_prob=0.04,
        missing_view_prob=0.03,
        scanner=ScannerProfile(
            manufacturer="Canon Medical Systems",
            model="Aplio i800",
            base_spacing_mm=0.07,
            aspect=1.0,
            gain_db=0.0,
            dynamic_range_db=48.0,
            gamma=0.95,
            speckle_axial_mm=0.12,
            speckle_lateral_mm=0.22,
            attenuation_db_per_mm=0.09,
            noise_grey=1.2,
            transfer_syntax="rle",
        ),
        report=ReportStyle(
            mention=_mention(
                location=0.9,
                size=0.95,
                composition=0.5,
                echogenicity=0.75,
                margin=0.65,
                calcification=0.6,
                shape=0.45,
            ),
            typo_rate=0.02,
            node_negative_prob=0.3,
            units="cm",
            dims="max",
        ),
    ),
    SiteProfile(
        name="site-e",
        role="external",
        description="Cancer hospital, surgical oncology",
        institution="Synthetic Cancer Hospital E",
        target_prevalence=0.65,
        male_prob=0.25,
        age_mean=44.0,
        age_sd=12.0,
        size_median_mm=8.6,
        capsule_scale_mm=2.2,
        node_finding_prob=0.14,
        missing_report_prob=0.02,
        missing_view_prob=0.02,
        scanner=ScannerProfile(
            manufacturer="Mindray",
            model="Resona 7",
            base_spacing_mm=0.13,
            aspect=1.33,
            gain_db=3.0,
            dynamic_range_db=42.0,
            gamma=0.8,
            speckle_axial_mm=0.22,
            speckle_lateral_mm=0.42,
            attenuation_db_per_mm=0.07,
            noise_grey=2.5,
            border_top=0.05,
            border_side=0.03,
            photometric="RGB",
            tint=(1.0, 0.92, 0.78),
        ),
        report=ReportStyle(
            mention=_mention(
                location=0.98,
                size=0.97,
                composition=0.9,
                echogenicity=0.95,
                margin=0.9,
                calcification=0.9,
                shape=0.85,
            ),
            typo_rate=0.003,
            node_negative_prob=0.9,
            units="mm",
            dims="three",
        ),
    ),
    SiteProfile(
        name="site-f",
        role="external",
        description="County hospital, mixed imaging",
        institution="Synthetic County Hospital F",
        target_prevalence=0.38,
        male_prob=0.24,
        age_mean=45.5,
        age_sd=11.5,
        size_median_mm=7.8,
        capsule_scale_mm=3.0,
        node_finding_prob=0.07,
        missing_report_prob=0.05,
        missing_view_prob=0.04,
        scanner=ScannerProfile(
            manufacturer="SAMSUNG MEDISON CO., LTD.",
            model="RS85",
            base_spacing_mm=0.11,
            aspect=1.25,
            gain_db=-2.0,
            dynamic_range_db=44.0,
            gamma=1.1,
            speckle_axial_mm=0.18,
            speckle_lateral_mm=0.34,
            attenuation_db_per_mm=0.12,
            noise_grey=3.0,
            doppler_strip=0.22,
        ),
        report=ReportStyle(
            mention=_mention(
                location=0.85,
                size=0.85,
                composition=0.4,
                echogenicity=0.7,
                margin=0.6,
                calcification=0.65,
                shape=0.35,
            ),
            typo_rate=0.025,
            node_negative_prob=0.2,
            units="mm",
            dims="max",
        ),
    ),
    SiteProfile(
        name="site-g",
        role="external",
        description="Community hospital, outpatient ultrasound",
        institution="Synthetic Community Hospital G",
        target_prevalence=0.35,
        male_prob=0.21,
        age_mean=44.0,
        age_sd=11.0,
        size_median_mm=8.2,
        capsule_scale_mm=3.1,
        node_finding_prob=0.07,
        missing_report_prob=0.04,
        missing_view_prob=0.04,
        scanner=ScannerProfile(
            manufacturer="ESAOTE",
            model="MyLab X8",
            base_spacing_mm=0.15,
            aspect=1.0,
            gain_db=1.0,
            dynamic_range_db=40.0,
            gamma=1.2,
            speckle_axial_mm=0.25,
            speckle_lateral_mm=0.45,
            attenuation_db_per_mm=0.11,
            noise_grey=3.5,
            border_top=0.06,
            border_side=0.05,
        ),
        report=ReportStyle(
            mention=_mention(
                location=0.92,
                size=0.9,
                composition=0.75,
                echogenicity=0.85,
                margin=0.7,
                calcification=0.8,
                shape=0.6,
            ),
            typo_rate=0.012,
            node_negative_prob=0.6,
            units="mm",
            dims="three_lwd",
        ),
    ),
)


def site_profiles(n_sites: int) -> tuple[SiteProfile, ...]:
    """The first ``n_sites`` profiles (1 to 7)."""
    if not 1 <= n_sites <= len(SITE_PROFILES):
        raise ValueError(f"--sites must be between 1 and {len(SITE_PROFILES)}, got {n_sites}")
    return SITE_PROFILES[:n_sites]


def with_mention_scale(profile: SiteProfile, factor: float) -> SiteProfile:
    """The site as it reports under a profile that mentions findings ``factor`` times as often."""
    if factor == 1.0:
        return profile
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"a report mention factor must be within [0, 1], got {factor}")
    mention = {k: round(v * factor, 6) for k, v in profile.report.mention.items()}
    return replace(profile, report=replace(profile.report, mention=mention))


def layout_proportions(profile: str) -> tuple[float, ...]:
    """The site proportions of a ``--profile`` name (:data:`LAYOUTS`)."""
    if profile not in LAYOUTS:
        raise ValueError(f"--profile {profile!r} is unknown; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[profile]


def site_sizes(total: int, n_sites: int, minimum: int = MIN_PATIENTS_PER_SITE,
               proportions: tuple[float, ...] = SITE_PROPORTIONS) -> list[int]:
    """Split ``total`` patients over ``n_sites`` by ``proportions`` (largest remainder).

    Every site gets at least ``minimum`` patients; what that costs is taken from the largest sites, so the
    spread of sizes stays realistic for any total.
    """
    if n_sites < 1 or n_sites > len(proportions):
        raise ValueError(f"--sites must be between 1 and {len(proportions)}, got {n_sites}")
    if total < minimum * n_sites:
        raise ValueError(
            f"--patients {total} is too few for {n_sites} sites: every site needs at least {minimum} "
            "patients "
            f"(so at least {minimum * n_sites} in total)"
        )
    props = proportions[:n_sites]
    scale = sum(props)
    quotas = [total * p / scale for p in props]
    sizes = [int(q) for q in quotas]
    order = sorted(range(n_sites), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    for i in range(n_sites):
        while sizes[i] < minimum:
            donor = max(range(n_sites), key=lambda j: (sizes[j], -j))
            sizes[donor] -= 1
            sizes[i] += 1
    return sizes
