"""A site's own settings: what its operator put in the SuperNode's node config, never the coordinator.

`llnm-site join` writes them into `--node-config`; in simulation `make_client_app` passes defaults and
per-site values in their place. Everything that runs at a site reads them from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context

# The site's policy (node-config keys; `llnm-site join` flags of the same names). The site enforces them on
# every message, whatever the coordinator's round config says.
REQUIRE_PATIENT_DP = "require-patient-dp"
EVAL_SPLITS = "eval-splits"
DEFAULT_EVAL_SPLITS: tuple[str, ...] = ("val", "test")
ALLOWED_EVAL_SPLITS: tuple[str, ...] = ("val", "test")  # never `train`: metrics on training data are not offered


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

    @classmethod
    def from_context(cls, context: Context, site_dirs: list[str] | None,
                     defaults: dict[str, Any] | None = None) -> SiteSettings:
        cfg = {**(defaults or {}), **dict(context.node_config)}
        if "data-path" in cfg:
            data_path = Path(str(cfg["data-path"]))
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
        per_site = cfg.pop("site-node-config", None) or {}
        cfg = {**cfg, **dict(per_site.get(data_path.name, {}))}

        def opt_path(key: str) -> Path | None:
            return Path(str(cfg[key])) if cfg.get(key) not in (None, "") else None

        eps = cfg.get("max-patient-epsilon")
        return cls(
            data_path=data_path,
            name=str(cfg["site-name"]) if cfg.get("site-name") else None,
            cache_dir=opt_path("cache-dir") or (Path(os.environ["LLNM_CACHE_DIR"])
                                                if os.environ.get("LLNM_CACHE_DIR") else None),
            device=str(cfg.get("device", "auto")),
            max_patient_epsilon=float(eps) if eps not in (None, "", 0, 0.0) else None,
            privacy_state_dir=opt_path("privacy-state-dir"),
            threads=int(cfg["threads"]) if cfg.get("threads") not in (None, "", 0) else None,
            require_patient_dp=parse_bool(REQUIRE_PATIENT_DP, cfg.get(REQUIRE_PATIENT_DP, False)),
            eval_splits=parse_eval_splits(cfg.get(EVAL_SPLITS, ",".join(DEFAULT_EVAL_SPLITS))),
        )

    def apply_threads(self) -> None:
        """Use the CPU threads this site was given (oversubscribed threads make CPU training crawl)."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)


def site_name(settings: SiteSettings) -> str:
    """The node config's `site-name`, else `name` in the site's site.yaml, else the folder name."""
    if settings.name:
        return settings.name
    meta = settings.data_path / "site.yaml"
    if meta.is_file():
        import yaml

        data = yaml.safe_load(meta.read_text(encoding="utf-8")) or {}
        if isinstance(data, dict) and data.get("name"):
            return str(data["name"])
    return settings.data_path.resolve().name
