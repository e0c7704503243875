"""The generative risk model of the synthetic consortium: patient features, LLNM label and risk stage.

Every patient's features are drawn independently of each other (the one exception: a nodule with
extrathyroidal extension touches the capsule, so its capsule distance is 0). The LLNM probability is a
logistic model of those features with a per-site intercept; the intercept is calibrated so that a site's
expected prevalence equals its target. Because the joint distribution is known exactly, the best AUC any
model can reach from a subset of the information (one modality) is computable: it is the AUC of
E[risk | what that modality shows], estimated here by Monte Carlo over the features it does not show.
The model follows the LLNM-Net paper's findings: nodules close to the capsule (< 2.5 mm) have an LLNM rate
above 72 %, upper and middle thirds are riskier than the lower third, and size, margin, echogenicity,
microcalcifications, shape, younger age, male sex and a report-only lymph-node finding add risk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, special

from .profiles import SITE_PROFILES, SiteProfile

THIRDS: tuple[str, ...] = ("upper", "middle", "lower")
LOBES: tuple[str, ...] = ("right", "left")
MARGINS: tuple[str, ...] = ("smooth", "ill-defined", "lobulated", "irregular", "extrathyroidal")
ECHOGENICITIES: tuple[str, ...] = ("hyperechoic", "isoechoic", "hypoechoic", "markedly hypoechoic")
COMPOSITIONS: tuple[str, ...] = ("solid", "predominantly solid", "mixed cystic-solid")
ETE = MARGINS.index("extrathyroidal")

#: The terms of the logistic model; a modality "sees" a subset of them.
FEATURES: tuple[str, ...] = (
    "capsule",
    "third",
    "lobe",
    "size",
    "margin",
    "echogenicity",
    "composition",
    "microcalc",
    "shape",
    "age",
    "sex",
    "node",
)
#: What each ultrasound view shows (the transverse view shows the lobe side through the trachea's position,
#: the nodule's width and depth and its distance to the capsule; the longitudinal view shows the third).
TRANS_VIEW_FEATURES = frozenset(
    {"capsule", "lobe", "size", "margin", "echogenicity", "composition", "microcalc", "shape"}
)
LONG_VIEW_FEATURES = frozenset({"third", "size", "margin", "echogenicity", "composition", "microcalc"})
CLINICAL_FEATURES = frozenset({"age", "sex"})

#: Seed of the fixed reference sample used to calibrate site intercepts (independent of the user's seed, so
#: a site's intercept is a property of its profile, not of one consortium).
CALIBRATION_SEED = 20250801
CALIBRATION_DRAWS = 100_000


@dataclass(frozen=True)
class RiskModel:
    """Feature distributions and logistic coefficients (all stored in ``consortium.json``).

    Tuples are aligned with :data:`THIRDS`, :data:`MARGINS`, :data:`ECHOGENICITIES`, :data:`COMPOSITIONS`.
    """

    third_probs: tuple[float, ...] = (0.30, 0.42, 0.28)
    left_prob: float = 0.48
    margin_probs: tuple[float, ...] = (0.42, 0.20, 0.12, 0.18, 0.08)
    echo_probs: tuple[float, ...] = (0.05, 0.14, 0.60, 0.21)
    composition_probs: tuple[float, ...] = (0.82, 0.12, 0.06)
    microcalc_prob: float = 0.42
    ttw_prob: float = 0.35
    size_log_sd: float = 0.65
    size_min_mm: float = 2.5
    size_max_mm: float = 40.0
    capsule_shape: float = 2.0
    capsule_max_mm: float = 9.0
    # logistic coefficients
    capsule_beta: float = 4.8  # added at distance 0, decaying as exp(-d / capsule_decay_mm)
    capsule_decay_mm: float = 2.0
    third_beta: tuple[float, ...] = (0.9, 0.6, 0.0)
    left_beta: float = 0.1
    size_beta_per_doubling: float = 0.7
    size_ref_mm: float = 7.0
    margin_beta: tuple[float, ...] = (0.0, 0.5, 0.7, 1.1, 1.4)
    echo_beta: tuple[float, ...] = (-0.9, -0.6, 0.0, 0.5)
    composition_beta: tuple[float, ...] = (0.0, -0.3, -0.7)
    microcalc_beta: float = 1.1
    ttw_beta: float = 0.35
    age_beta_per_year: float = -0.03
    age_ref: float = 43.0
    male_beta: float = 0.4
    node_beta: float = 3.0
    # risk stage of positives: latent = w_risk * features' logit + w_size * log2(size / ref) + logistic noise
    stage_risk_weight: float = 0.6
    stage_size_weight: float = 0.8
    stage_cuts: tuple[float, float] = (4.0, 6.5)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters, with the category names the tuples are aligned with."""
        out: dict[str, Any] = asdict(self)
        out["categories"] = {
            "third": list(THIRDS),
            "lobe": list(LOBES),
            "margin": list(MARGINS),
            "echogenicity": list(ECHOGENICITIES),
            "composition": list(COMPOSITIONS),
        }
        out["formula"] = (
            "logit P(LLNM) = site_intercept + capsule_beta*exp(-capsule_mm/capsule_decay_mm)"
            " + third_beta[third] + left_beta*[lobe=left]"
            " + size_beta_per_doubling*log2(size_mm/size_ref_mm) + margin_beta[margin]"
            " + echo_beta[echogenicity] + composition_beta[composition] + microcalc_beta*microcalc"
            " + ttw_beta*taller_than_wide + age_beta_per_year*(age-age_ref) + male_beta*male"
            " + node_beta*report_only_node_finding"
        )
        return out


DEFAULT_MODEL = RiskModel()

#: The risk function of ``llnm-synth --profile paper-calibrated``: the default model's terms, re-weighted so that
#: the Bayes-optimal model's own attribution (`truth_attribution`: integrated gradients of the LLNM probability
#: from the average patient) splits like the paper's feature contribution analysis: location 48.8%, morphology
#: 29.9%, report 19.7%, demographics 1.6%. Fitted by scaling each group's coefficients together (location x1.8,
#: morphology x0.54, report x1.62, demographics x0.13) on 14,000 sampled patients with the capsule term's decay
#: set to 2.5 mm, the paper's threshold, then rounded; the fitted shares are in every consortium.json.
PAPER_CALIBRATED_MODEL = RiskModel(
    capsule_beta=7.2,
    capsule_decay_mm=2.5,
    third_beta=(1.62, 1.08, 0.0),
    left_beta=0.18,
    size_beta_per_doubling=0.38,
    margin_beta=(0.0, 0.27, 0.38, 0.6, 0.76),
    echo_beta=(-0.49, -0.33, 0.0, 0.27),
    composition_beta=(0.0, -0.16, -0.38),
    microcalc_beta=0.6,
    ttw_beta=0.19,
    age_beta_per_year=-0.004,
    male_beta=0.053,
    node_beta=4.86,
)

#: The risk function each ``--profile`` draws its labels from.
RISK_MODELS: dict[str, RiskModel] = {
    "default": DEFAULT_MODEL,
    "paper": DEFAULT_MODEL,
    "paper-calibrated": PAPER_CALIBRATED_MODEL,
}


def profile_by_name(name: str) -> SiteProfile:
    """The built-in profile called ``name`` (``site-a`` ... ``site-g``)."""
    for profile in SITE_PROFILES:
        if profile.name == name:
            return profile
    raise ValueError(f"unknown site {name!r}; known: {[p.name for p in SITE_PROFILES]}")


def _truncated_gamma(
    rng: np.random.Generator, n: int, shape: float, scale: float, upper: float
) -> np.ndarray:
    """Gamma draws restricted to [0, upper] by inverse CDF (one uniform per draw keeps streams aligned)."""
    cap = special.gammainc(shape, upper / scale)
    return scale * special.gammaincinv(shape, rng.random(n) * cap)


def _capsule_draws(rng: np.random.Generator, n: int, profile: SiteProfile, model: RiskModel) -> np.ndarray:
    """Capsule distance of nodules without extrathyroidal extension: > 0 (0.1 mm at least), 0.1 mm steps.

    Only an extrathyroidal nodule has distance exactly 0, which keeps "distance 0" and "ETE" equivalent.
    """
    draws = _truncated_gamma(rng, n, model.capsule_shape, profile.capsule_scale_mm, model.capsule_max_mm)
    return np.maximum(np.round(draws, 1), 0.1)


def _draw_codes(
    n: int, profile: SiteProfile, rng: np.random.Generator, model: RiskModel
) -> dict[str, np.ndarray]:
    """The feature draw, as numbers (category indices, booleans, mm): fast enough for large reference samples.

    Distances and sizes are rounded to 0.1 mm, the precision at which reports state them, so that a report
    mentioning a size reveals exactly the value the risk model used.
    """
    age = rng.normal(profile.age_mean, profile.age_sd, n)
    for _ in range(100):  # adults only: redraw out-of-range ages
        bad = (age < 18.0) | (age > 90.0)
        if not bad.any():
            break
        age[bad] = rng.normal(profile.age_mean, profile.age_sd, int(bad.sum()))
    age = np.clip(np.rint(age), 18, 90).astype(int)
    male = rng.random(n) < profile.male_prob
    third = rng.choice(len(THIRDS), n, p=model.third_probs)
    left = rng.random(n) < model.left_prob
    margin = rng.choice(len(MARGINS), n, p=model.margin_probs)
    echo = rng.choice(len(ECHOGENICITIES), n, p=model.echo_probs)
    composition = rng.choice(len(COMPOSITIONS), n, p=model.composition_probs)
    microcalc = rng.random(n) < model.microcalc_prob
    ttw = rng.random(n) < model.ttw_prob
    node = rng.random(n) < profile.node_finding_prob
    # size: log-normal around the site's median, truncated to [size_min, size_max]
    mu = np.log(profile.size_median_mm)
    lo, hi = special.ndtr(
        [
            (np.log(model.size_min_mm) - mu) / model.size_log_sd,
            (np.log(model.size_max_mm) - mu) / model.size_log_sd,
        ]
    )
    size = np.exp(mu + model.size_log_sd * special.ndtri(lo + (hi - lo) * rng.random(n)))
    size = np.round(size, 1)
    # nodule dimensions (width, antero-posterior depth, length); taller-than-wide means depth > width
    depth_ratio = np.where(ttw, rng.uniform(1.08, 1.6, n), rng.uniform(0.55, 0.94, n))
    length_ratio = rng.uniform(0.9, 1.6, n)
    scale = size / np.maximum(np.maximum(depth_ratio, length_ratio), 1.0)
    width_mm = np.round(scale, 1)
    depth_mm = np.round(scale * depth_ratio, 1)
    length_mm = np.round(scale * length_ratio, 1)
    size = np.maximum(np.maximum(width_mm, depth_mm), length_mm)
    capsule = _capsule_draws(rng, n, profile, model)
    capsule = np.where(margin == ETE, 0.0, capsule)
    return {
        "age": age,
        "male": male,
        "third": third,
        "left": left,
        "margin": margin,
        "echo": echo,
        "composition": composition,
        "microcalc": microcalc,
        "ttw": depth_mm > width_mm,
        "node": node,
        "size": size,
        "width": width_mm,
        "depth": depth_mm,
        "length": length_mm,
        "capsule": capsule,
    }


def sample_features(
    n: int, profile: SiteProfile, rng: np.random.Generator, model: RiskModel = DEFAULT_MODEL
) -> pd.DataFrame:
    """Draw ``n`` patients' features for one site (no label): the truth every modality is rendered from."""
    c = _draw_codes(n, profile, rng, model)
    return pd.DataFrame(
        {
            "age": c["age"],
            "sex": np.where(c["male"], "M", "F"),
            "lobe": np.array(LOBES)[c["left"].astype(int)],
            "third": np.array(THIRDS)[c["third"]],
            "capsule_mm": c["capsule"],
            "size_mm": c["size"],
            "width_mm": c["width"],
            "depth_mm": c["depth"],
            "length_mm": c["length"],
            "taller_than_wide": c["ttw"],
            "margin": np.array(MARGINS)[c["margin"]],
            "echogenicity": np.array(ECHOGENICITIES)[c["echo"]],
            "composition": np.array(COMPOSITIONS)[c["composition"]],
            "microcalcifications": c["microcalc"],
            "node_finding": c["node"],
        }
    )


def _codes(values: pd.Series | np.ndarray, categories: tuple[str, ...]) -> np.ndarray:
    """Category index per value; a value outside ``categories`` is an error, never silently mapped."""
    arr = np.asarray(values)
    codes = np.full(arr.shape, -1, dtype=int)
    for i, cat in enumerate(categories):
        codes[arr == cat] = i
    if (codes < 0).any():
        bad = sorted(set(arr[codes < 0].tolist()))
        raise ValueError(f"unknown categories {bad}; expected one of {list(categories)}")
    return codes


def capsule_term(capsule_mm: np.ndarray | float, model: RiskModel = DEFAULT_MODEL) -> np.ndarray:
    """Logit contribution of the nodule's distance to the capsule (maximal when touching it)."""
    return model.capsule_beta * np.exp(-np.asarray(capsule_mm, dtype=float) / model.capsule_decay_mm)


def _terms_from_codes(c: Mapping[str, np.ndarray], model: RiskModel) -> dict[str, np.ndarray]:
    return {
        "capsule": capsule_term(c["capsule"], model),
        "third": np.asarray(model.third_beta)[c["third"]],
        "lobe": model.left_beta * np.asarray(c["left"], dtype=bool),
        "size": model.size_beta_per_doubling
        * np.log2(np.asarray(c["size"], dtype=float) / model.size_ref_mm),
        "margin": np.asarray(model.margin_beta)[c["margin"]],
        "echogenicity": np.asarray(model.echo_beta)[c["echo"]],
        "composition": np.asarray(model.composition_beta)[c["composition"]],
        "microcalc": model.microcalc_beta * np.asarray(c["microcalc"], dtype=bool),
        "shape": model.ttw_beta * np.asarray(c["ttw"], dtype=bool),
        "age": model.age_beta_per_year * (np.asarray(c["age"], dtype=float) - model.age_ref),
        "sex": model.male_beta * np.asarray(c["male"], dtype=bool),
        "node": model.node_beta * np.asarray(c["node"], dtype=bool),
    }


def feature_terms(df: pd.DataFrame, model: RiskModel = DEFAULT_MODEL) -> dict[str, np.ndarray]:
    """Each feature's additive contribution to the logit (keys: :data:`FEATURES`)."""
    sex = df["sex"].to_numpy()
    if not np.isin(sex, ("F", "M")).all():
        raise ValueError(f"sex must be F or M, got {sorted(set(sex.tolist()) - {'F', 'M'})}")
    codes = {
        "capsule": df["capsule_mm"].to_numpy(float),
        "third": _codes(df["third"], THIRDS),
        "left": _codes(df["lobe"], LOBES) == 1,
        "size": df["size_mm"].to_numpy(float),
        "margin": _codes(df["margin"], MARGINS),
        "echo": _codes(df["echogenicity"], ECHOGENICITIES),
        "composition": _codes(df["composition"], COMPOSITIONS),
        "microcalc": df["microcalcifications"].to_numpy(bool),
        "ttw": df["taller_than_wide"].to_numpy(bool),
        "age": df["age"].to_numpy(float),
        "male": sex == "M",
        "node": df["node_finding"].to_numpy(bool),
    }
    return _terms_from_codes(codes, model)


def _features_logit(terms: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.sum([np.asarray(terms[f], dtype=float) for f in FEATURES], axis=0)


def _case_mix_key(profile: SiteProfile) -> tuple[Any, ...]:
    return (
        profile.name,
        profile.target_prevalence,
        profile.male_prob,
        profile.age_mean,
        profile.age_sd,
        profile.size_median_mm,
        profile.capsule_scale_mm,
        profile.node_finding_prob,
    )


_INTERCEPTS: dict[tuple[Any, ...], float] = {}


def _solve_intercept(profile: SiteProfile, model: RiskModel) -> float:
    site_index = sum(ord(c) for c in profile.name)
    rng = np.random.default_rng([CALIBRATION_SEED, site_index])
    logit = _features_logit(_terms_from_codes(_draw_codes(CALIBRATION_DRAWS, profile, rng, model), model))
    target = profile.target_prevalence

    def gap(b: float) -> float:
        return float(special.expit(b + logit).mean() - target)

    return float(optimize.brentq(gap, -30.0, 30.0, xtol=1e-10))


def site_intercept(profile: SiteProfile, model: RiskModel = DEFAULT_MODEL) -> float:
    """Intercept that makes the site's expected LLNM prevalence equal its target (fixed reference sample)."""
    key = (_case_mix_key(profile), model)
    if key not in _INTERCEPTS:
        _INTERCEPTS[key] = _solve_intercept(profile, model)
    return _INTERCEPTS[key]


def sample_stage(
    features_logit: np.ndarray,
    size_mm: np.ndarray,
    llnm: np.ndarray,
    rng: np.random.Generator,
    model: RiskModel = DEFAULT_MODEL,
) -> np.ndarray:
    """Risk stage 1-3 for positive patients (0 for negatives): higher risk and larger nodules, higher stage.

    Stage 3 (a metastatic node > 3 cm) is the rarest, as in the paper's Table 1 (most positives have 1-5
    small metastatic nodes).
    """
    latent = (
        model.stage_risk_weight * features_logit
        + model.stage_size_weight * np.log2(size_mm / model.size_ref_mm)
        + rng.logistic(0.0, 1.0, len(features_logit))
    )
    stage = 1 + (latent > model.stage_cuts[0]).astype(int) + (latent > model.stage_cuts[1]).astype(int)
    return np.where(llnm.astype(bool), stage, 0)


def label_patients(
    features: pd.DataFrame, profile: SiteProfile, rng: np.random.Generator, model: RiskModel = DEFAULT_MODEL
) -> pd.DataFrame:
    """Add the true risk, the sampled LLNM label and the risk stage to a feature table (a copy)."""
    out = features.copy()
    logit = _features_logit(feature_terms(features, model))
    risk = special.expit(site_intercept(profile, model) + logit)
    llnm = rng.random(len(out)) < risk
    out["risk"] = risk
    out["llnm"] = llnm.astype(int)
    out["risk_stage"] = sample_stage(logit, features["size_mm"].to_numpy(float), llnm, rng, model)
    return out


def sample_patients(
    n: int,
    *,
    site: str | SiteProfile = "site-a",
    seed: int | np.random.Generator = 0,
    model: RiskModel = DEFAULT_MODEL,
) -> pd.DataFrame:
    """Draw ``n`` labelled patients of one site without rendering anything.

    The exact code path the generator uses for the truth, exposed so that tests and analyses can check the
    generative effects (capsule distance, thirds, ...) on large samples in milliseconds.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    profile = profile_by_name(site) if isinstance(site, str) else site
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return label_patients(sample_features(n, profile, rng, model), profile, rng, model)


def expected_risk(
    patients: pd.DataFrame,
    seen: Mapping[str, np.ndarray],
    profile: SiteProfile,
    rng: np.random.Generator,
    model: RiskModel = DEFAULT_MODEL,
    draws: int = 1000,
    chunk: int = 256,
) -> np.ndarray:
    """E[risk | the features marked seen], per patient, by Monte Carlo over the unseen ones.

    ``seen[f]`` is a boolean array (one per patient) for every feature in :data:`FEATURES`. Unseen features
    are drawn from the site's distribution (they are independent of the seen ones, except capsule distance,
    which is 0 exactly when the margin is extrathyroidal: it is drawn conditionally on a seen margin, and a
    seen capsule distance conditions an unseen margin). The site is taken as known, as a model can tell
    sites apart (scanner, wording); the value is therefore an upper bound on what a model can reach.
    """
    missing = set(FEATURES) - set(seen)
    if missing:
        raise ValueError(f"seen lacks features {sorted(missing)}")
    n = len(patients)
    if n == 0:
        return np.zeros(0)
    intercept = site_intercept(profile, model)
    ref_terms = _terms_from_codes(_draw_codes(draws, profile, rng, model), model)
    # capsule distance of a non-ETE nodule, and a margin drawn given "not ETE", for the conditional cases
    cap_non_ete = capsule_term(_capsule_draws(rng, draws, profile, model), model)
    non_ete = np.asarray(model.margin_probs, dtype=float)
    non_ete[ETE] = 0.0
    margin_non_ete = np.asarray(model.margin_beta)[rng.choice(len(MARGINS), draws, p=non_ete / non_ete.sum())]
    pat_terms = feature_terms(patients, model)
    pat_margin = _codes(patients["margin"], MARGINS)
    cap_zero = float(capsule_term(0.0, model))
    out = np.empty(n)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        logit = np.full((sl.stop - sl.start, draws), intercept)
        s_cap = np.asarray(seen["capsule"][sl], bool)[:, None]
        s_mar = np.asarray(seen["margin"][sl], bool)[:, None]
        for f in FEATURES:
            if f in ("capsule", "margin"):
                continue
            s = np.asarray(seen[f][sl], bool)[:, None]
            logit += np.where(s, pat_terms[f][sl, None], ref_terms[f][None, :])
        # capsule: seen -> own; margin seen -> 0 if ETE else non-ETE draw; neither -> joint reference draw
        is_ete = (pat_margin[sl] == ETE)[:, None]
        cap_given_margin = np.where(is_ete, cap_zero, cap_non_ete[None, :])
        logit += np.where(
            s_cap,
            pat_terms["capsule"][sl, None],
            np.where(s_mar, cap_given_margin, ref_terms["capsule"][None, :]),
        )
        # margin: seen -> own; capsule seen -> ETE iff distance 0; neither -> joint reference draw
        touching = (patients["capsule_mm"].to_numpy(float)[sl] <= 0.0)[:, None]
        margin_given_cap = np.where(touching, model.margin_beta[ETE], margin_non_ete[None, :])
        logit += np.where(
            s_mar,
            pat_terms["margin"][sl, None],
            np.where(s_cap, margin_given_cap, ref_terms["margin"][None, :]),
        )
        out[sl] = special.expit(logit).mean(axis=1)
    return out
