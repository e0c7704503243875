"""A site's own settings: what its operator put in the SuperNode's node config, never the coordinator.

This module owns the node-config keys: `SiteSettings.from_context` reads them, and `SiteSettings.to_node_config`
with `render_node_config` writes them (`llnm-site join`'s `--node-config`), its exact inverse. In simulation
`make_client_app` passes defaults and per-site values in their place. Everything that runs at a site reads them
from here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context

# Where the site is (node-config keys `llnm-site join` sets from its flags).
DATA_PATH = "data-path"
SITE_NAME = "site-name"
CACHE_DIR = "cache-dir"
DEVICE = "device"
PRIVACY_STATE_DIR = "privacy-state-dir"
THREADS = "threads"
#: Simulation only: per-site node config keyed by site folder name (a deployment's SuperNodes each have their own).
SITE_NODE_CONFIG = "site-node-config"
# The site's policy (node-config keys; `llnm-site join` flags of the same names). The site enforces them on
# every message, whatever the coordinator's round config says.
REQUIRE_PATIENT_DP = "require-patient-dp"
MAX_PATIENT_EPSILON = "max-patient-epsilon"  # lifetime budget over every run that touches the site's patients
EVAL_SPLITS = "eval-splits"
PATIENT_DELTA = "patient-delta"  # the site's delta: its lifetime epsilon is kept at it; no run may use a larger one
MAX_CLIPPING_NORM = "max-clipping-norm"  # the largest per-patient clipping norm the site accepts
PUBLIC_PATIENT_COUNT = "public-patient-count"  # the patient count the site declares public (DP-SGD's parameters)
MAX_HISTOGRAM_BINS = "max-histogram-bins"  # the finest score histogram an evaluate reply may carry
SHARE_EXPLANATIONS = "share-explanations"  # false: never send explanation aggregates (evaluation.explain)
# The floor under the coordinator's DP-SGD settings: each implies require-patient-dp.
MAX_RUN_EPSILON = "max-run-epsilon"  # the largest epsilon one run may spend on the site's training patients
MIN_NOISE_MULTIPLIER = "min-noise-multiplier"  # the smallest DP-SGD noise multiplier the site trains with
REQUIRE_SECURE_AGGREGATION = "require-secure-aggregation"  # train only inside a SecAgg+ round
# Evaluation replies: differentially private by default (fl_client.privacy.evaluation).
EVAL_EPSILON = "eval-epsilon"  # epsilon of one evaluate reply (at patient-delta); its noise is calibrated to it
MAX_EVAL_EPSILON = "max-eval-epsilon"  # lifetime budget of every evaluation reply on the site's patients
EXACT_EVALUATION = "exact-evaluation"  # true: exact evaluate replies, which leave val/test patients unprotected
MIN_CELL_COUNT = "min-cell-count"  # explanation cells over fewer patients (noisy count) are suppressed
#: Keys that only make sense with patient-level DP on: each implies require-patient-dp.
DP_FLOOR_KEYS: tuple[str, ...] = (MAX_PATIENT_EPSILON, MAX_RUN_EPSILON, MIN_NOISE_MULTIPLIER)
DEFAULT_EVAL_SPLITS: tuple[str, ...] = ("val", "test")
ALLOWED_EVAL_SPLITS: tuple[str, ...] = ("val", "test")  # never `train`: metrics on training data are not offered
DEFAULT_PATIENT_DELTA = 1e-5
DEFAULT_MAX_HISTOGRAM_BINS = 100
DEFAULT_EVAL_EPSILON = 1.0
DEFAULT_MAX_EVAL_EPSILON = 10.0
DEFAULT_MIN_CELL_COUNT = 5
#: ``site.yaml`` field with the public patient count, used where the node config has no public-patient-count.
SITE_YAML_PUBLIC_COUNT = "public_patient_count"


class SiteSettingsError(RuntimeError):
    """A node-config value the site cannot accept; the text names the key and the value."""


def parse_bool(key: str, value: object) -> bool:
    """A node-config boolean: TOML/YAML true/false (or the strings true/false)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SiteSettingsError(f"node config {key}={value!r}: expected true or false")


def parse_eval_splits(value: object) -> tuple[str, ...]:
    """`eval-splits`: comma-separated split names among val, test (never train)."""
    if not isinstance(value, str):
        raise SiteSettingsError(f"node config {EVAL_SPLITS}={value!r}: expected a comma-separated string such as "
                                f"\"val,test\"")
    splits = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    if not splits:
        raise SiteSettingsError(f"node config {EVAL_SPLITS}={value!r}: names no split; allowed: "
                                f"{', '.join(ALLOWED_EVAL_SPLITS)}")
    if "train" in splits:
        raise SiteSettingsError(f"node config {EVAL_SPLITS}={value!r}: 'train' is never allowed (metrics on the "
                                f"training patients are not offered); allowed: {', '.join(ALLOWED_EVAL_SPLITS)}")
    bad = [x for x in splits if x not in ALLOWED_EVAL_SPLITS]
    if bad:
        raise SiteSettingsError(f"node config {EVAL_SPLITS}={value!r}: unknown split {bad[0]!r}; allowed: "
                                f"{', '.join(ALLOWED_EVAL_SPLITS)}")
    return splits


def parse_positive(key: str, value: object, kind: type = float, *, below_one: bool = False) -> float | int:
    """A positive, finite node-config number (an integer where `kind` is int; below 1 where `below_one`)."""
    number: float | int | None = None
    if isinstance(value, str):
        try:
            number = kind(value.strip())
        except ValueError:
            number = None
    elif not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int):
        number = kind(value)
    if number is None or not math.isfinite(number) or number <= 0 or (below_one and number >= 1):
        want = "a number in (0, 1)" if below_one else ("a positive integer" if kind is int else "a positive number")
        raise SiteSettingsError(f"node config {key}={value!r}: expected {want}")
    return number


def parse_histogram_bins(value: object) -> int:
    """`max-histogram-bins`: an even integer >= 2, so that the 0.5 threshold stays a bin edge."""
    bins = int(parse_positive(MAX_HISTOGRAM_BINS, value, int))
    if bins < 2 or bins % 2:
        raise SiteSettingsError(f"node config {MAX_HISTOGRAM_BINS}={value!r}: expected an even integer >= 2 (0.5, "
                                "the decision threshold, must stay a bin edge)")
    return bins


def check_dp_floor(floor: list[str], require_patient_dp: bool, prefix: str) -> None:
    """Refuse a DP floor (a budget, a run cap, a noise floor) with patient-level DP explicitly not required.

    Without DP-SGD a round spends no epsilon the floor could bound, yet it sends the exact loss, steps and
    patient count: a site that sets a floor means DP to be on, so the floor implies require-patient-dp and an
    explicit ``require-patient-dp=false`` beside it is a contradiction, refused with the keys named.
    """
    if floor and not require_patient_dp:
        names = ", ".join(f"{prefix}{k}" for k in floor)
        raise SiteSettingsError(
            f"{names} bound(s) patient-level DP-SGD, but {prefix}{REQUIRE_PATIENT_DP} is false: a round without "
            "DP spends no epsilon these bound and sends the exact training loss, steps and patient count. "
            f"Remove {prefix}{REQUIRE_PATIENT_DP}=false (the floor implies it) or remove {names}"
        )


@dataclass
class SiteSettings:
    """A site's own settings, from its SuperNode's node config (never from the coordinator)."""

    data_path: Path
    name: str | None
    cache_dir: Path | None
    device: str
    max_patient_epsilon: float | None
    privacy_state_dir: Path | None
    threads: int | None = None
    require_patient_dp: bool = False
    eval_splits: tuple[str, ...] = DEFAULT_EVAL_SPLITS
    patient_delta: float = DEFAULT_PATIENT_DELTA
    max_clipping_norm: float | None = None
    public_patient_count: int | None = None
    max_histogram_bins: int = DEFAULT_MAX_HISTOGRAM_BINS
    share_explanations: bool = True
    max_run_epsilon: float | None = None
    min_noise_multiplier: float | None = None
    require_secure_aggregation: bool = False
    eval_epsilon: float = DEFAULT_EVAL_EPSILON
    max_eval_epsilon: float = DEFAULT_MAX_EVAL_EPSILON
    exact_evaluation: bool = False
    min_cell_count: int = DEFAULT_MIN_CELL_COUNT

    def __post_init__(self) -> None:
        # A DP floor implies require-patient-dp (check_dp_floor); from_context refuses an explicit false.
        if any(v is not None for v in (self.max_patient_epsilon, self.max_run_epsilon, self.min_noise_multiplier)):
            self.require_patient_dp = True

    @classmethod
    def from_context(cls, context: Context, site_dirs: list[str] | None,
                     defaults: dict[str, Any] | None = None) -> SiteSettings:
        cfg = {**(defaults or {}), **dict(context.node_config)}
        if DATA_PATH in cfg:
            data_path = Path(str(cfg[DATA_PATH]))
        elif site_dirs is not None and "partition-id" in cfg:
            data_path = Path(site_dirs[int(cfg["partition-id"])])
        else:
            raise RuntimeError(
                "this SuperNode has no 'data-path' in its node config; start it with "
                "`llnm-site join --data SITE_DIR ...` or flower-supernode --node-config 'data-path=\"/path\"'"
            )
        if not data_path.is_dir():
            raise RuntimeError(f"data-path {data_path}: not a folder")
        # Simulation only: per-site node config (e.g. one hospital's own max-patient-epsilon), keyed by
        # site folder name, standing in for what each SuperNode's --node-config would set.
        per_site = cfg.pop(SITE_NODE_CONFIG, None) or {}
        cfg = {**cfg, **dict(per_site.get(data_path.name, {}))}

        def opt_path(key: str) -> Path | None:
            return Path(str(cfg[key])) if cfg.get(key) not in (None, "") else None

        def opt_positive(key: str, kind: type = float) -> float | int | None:
            value = cfg.get(key)
            return None if value in (None, "", 0, 0.0) else parse_positive(key, value, kind)

        floor = [k for k in DP_FLOOR_KEYS if opt_positive(k) is not None]
        require_dp = parse_bool(REQUIRE_PATIENT_DP, cfg.get(REQUIRE_PATIENT_DP, bool(floor)))
        check_dp_floor(floor, require_dp, "node config ")
        return cls(
            data_path=data_path,
            name=str(cfg[SITE_NAME]) if cfg.get(SITE_NAME) else None,
            cache_dir=opt_path(CACHE_DIR) or (Path(os.environ["LLNM_CACHE_DIR"])
                                              if os.environ.get("LLNM_CACHE_DIR") else None),
            device=str(cfg.get(DEVICE, "auto")),
            max_patient_epsilon=opt_positive(MAX_PATIENT_EPSILON),
            privacy_state_dir=opt_path(PRIVACY_STATE_DIR),
            threads=int(cfg[THREADS]) if cfg.get(THREADS) not in (None, "", 0) else None,
            require_patient_dp=require_dp,
            eval_splits=parse_eval_splits(cfg.get(EVAL_SPLITS, ",".join(DEFAULT_EVAL_SPLITS))),
            patient_delta=float(parse_positive(PATIENT_DELTA, cfg.get(PATIENT_DELTA, DEFAULT_PATIENT_DELTA),
                                               below_one=True)),
            max_clipping_norm=opt_positive(MAX_CLIPPING_NORM),
            public_patient_count=opt_positive(PUBLIC_PATIENT_COUNT, int),
            max_histogram_bins=parse_histogram_bins(cfg.get(MAX_HISTOGRAM_BINS, DEFAULT_MAX_HISTOGRAM_BINS)),
            share_explanations=parse_bool(SHARE_EXPLANATIONS, cfg.get(SHARE_EXPLANATIONS, True)),
            max_run_epsilon=opt_positive(MAX_RUN_EPSILON),
            min_noise_multiplier=opt_positive(MIN_NOISE_MULTIPLIER),
            require_secure_aggregation=parse_bool(REQUIRE_SECURE_AGGREGATION,
                                                  cfg.get(REQUIRE_SECURE_AGGREGATION, False)),
            eval_epsilon=float(parse_positive(EVAL_EPSILON, cfg.get(EVAL_EPSILON, DEFAULT_EVAL_EPSILON))),
            max_eval_epsilon=float(parse_positive(MAX_EVAL_EPSILON,
                                                  cfg.get(MAX_EVAL_EPSILON, DEFAULT_MAX_EVAL_EPSILON))),
            exact_evaluation=parse_bool(EXACT_EVALUATION, cfg.get(EXACT_EVALUATION, False)),
            min_cell_count=int(parse_positive(MIN_CELL_COUNT, cfg.get(MIN_CELL_COUNT, DEFAULT_MIN_CELL_COUNT), int)),
        )

    def to_node_config(self) -> dict[str, Any]:
        """The node config that `from_context` reads back as these settings (its inverse): every key set,
        the optional ones only when they have a value."""
        out: dict[str, Any] = {DATA_PATH: str(self.data_path)}
        if self.name:
            out[SITE_NAME] = self.name
        if self.cache_dir is not None:
            out[CACHE_DIR] = str(self.cache_dir)
        if self.device != "auto":
            out[DEVICE] = self.device
        if self.privacy_state_dir is not None:
            out[PRIVACY_STATE_DIR] = str(self.privacy_state_dir)
        if self.threads:
            out[THREADS] = int(self.threads)
        policy = {k: v for k, v in self.policy().items() if v is not None}
        if self.exact_evaluation:  # the policy shows no evaluation epsilon then; the node config keeps them
            policy[EVAL_EPSILON], policy[MAX_EVAL_EPSILON] = self.eval_epsilon, self.max_eval_epsilon
        return {**out, **policy}

    def policy(self) -> dict[str, Any]:
        """The site's privacy policy as its node-config keys (what `llnm-site privacy` and replies show)."""
        return {
            REQUIRE_PATIENT_DP: self.require_patient_dp,
            MAX_PATIENT_EPSILON: self.max_patient_epsilon,
            PATIENT_DELTA: self.patient_delta,
            MAX_CLIPPING_NORM: self.max_clipping_norm,
            PUBLIC_PATIENT_COUNT: self.public_patient_count,
            EVAL_SPLITS: ",".join(self.eval_splits),
            MAX_HISTOGRAM_BINS: self.max_histogram_bins,
            SHARE_EXPLANATIONS: self.share_explanations,
            MAX_RUN_EPSILON: self.max_run_epsilon,
            MIN_NOISE_MULTIPLIER: self.min_noise_multiplier,
            REQUIRE_SECURE_AGGREGATION: self.require_secure_aggregation,
            EVAL_EPSILON: None if self.exact_evaluation else self.eval_epsilon,
            MAX_EVAL_EPSILON: None if self.exact_evaluation else self.max_eval_epsilon,
            EXACT_EVALUATION: self.exact_evaluation,
            MIN_CELL_COUNT: self.min_cell_count,
        }

    def apply_threads(self) -> None:
        """Use the CPU threads this site was given (oversubscribed threads make CPU training crawl)."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)


def toml_value(value: object) -> str:
    """A node-config value as TOML (what Flower's `--node-config` parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    import json

    return json.dumps(str(value))


def render_node_config(values: dict[str, Any]) -> str:
    """`--node-config`'s one argument: space-separated TOML ``key=value`` pairs."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def _site_yaml(settings: SiteSettings) -> dict[str, Any]:
    meta = settings.data_path / "site.yaml"
    if not meta.is_file():
        return {}
    import yaml

    data = yaml.safe_load(meta.read_text(encoding="utf-8")) or {}
    return data if isinstance(data, dict) else {}


def declared_patient_count(settings: SiteSettings) -> tuple[int | None, str]:
    """The patient count the site declares public, and where it is declared (None if it declares none).

    The node config's ``public-patient-count`` wins over ``public_patient_count`` in the site's site.yaml.
    """
    if settings.public_patient_count is not None:
        return settings.public_patient_count, f"node config {PUBLIC_PATIENT_COUNT}"
    value = _site_yaml(settings).get(SITE_YAML_PUBLIC_COUNT)
    if value is None:
        return None, "not declared"
    where = f"{settings.data_path / 'site.yaml'} field {SITE_YAML_PUBLIC_COUNT}"
    try:
        return int(parse_positive(where, value, int)), where
    except SiteSettingsError as exc:
        raise SiteSettingsError(str(exc).replace("node config ", "")) from None


def site_name(settings: SiteSettings) -> str:
    """The node config's `site-name`, else `name` in the site's site.yaml, else the folder name."""
    if settings.name:
        return settings.name
    name = _site_yaml(settings).get("name")
    return str(name) if name else settings.data_path.resolve().name
