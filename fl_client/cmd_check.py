"""`llnm-site check SITE_DIR`: validate a site folder against the data contract (docs/site-data.md).

Exit status is what scripts and the join step rely on: 0 when the site is usable (warnings allowed), 1 when
any error was found, 2 when SITE_DIR is not a folder at all (nothing could be checked).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USABLE = 0
EXIT_ERRORS = 1
EXIT_NO_SITE = 2


def _frame(value: str) -> str | int:
    """`first`, `middle`, `last` or a 0-based frame index, as the preprocessing config accepts."""
    from shared_model.config import parse_frame

    try:
        return parse_frame(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "site_dir", metavar="SITE_DIR", type=Path, help="the site folder (holds patients.csv)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--quick", action="store_true", help="check the table only; do not open images, masks or reports"
    )
    parser.add_argument(
        "--frame",
        type=_frame,
        default="middle",
        help="cine frame to decode: first, middle (default), last or a 0-based index (as in training)",
    )
    parser.add_argument(
        "--masks", choices=["drawn", "predicted", "drawn-else-predicted"],
        help="show where each view's masks would come from under this preprocess.masks (default: the "
        "--experiment's, else the drawn ones only); predicted masks are those `llnm-site segment` wrote",
    )
    parser.add_argument("--segmenter-sha256", metavar="HASH",
                        help="the segmenter whose predicted masks --masks uses (what llnm-site segment prints)")
    parser.add_argument("--cache-dir", help="the site's cache folder, where llnm-site segment wrote its masks "
                        "(default $LLNM_CACHE_DIR or ~/.cache/llnm-fl)")
    parser.add_argument(
        "--experiment", type=Path, metavar="CONFIG.yaml",
        help="judge the table against this experiment's preprocess.inputs (what its rounds would ask of the "
        "site) instead of the site's own declaration in site.yaml",
    )


def _mask_config(args: argparse.Namespace):
    """The preprocessing whose mask source to show: --masks with --segmenter-sha256, else the experiment's
    preprocess section; None when the masks are the drawn ones."""
    from shared_model.config import PreprocessConfig

    if args.masks is not None:
        return PreprocessConfig.from_dict({"masks": args.masks, "segmenter_sha256": args.segmenter_sha256},
                                          source="--masks/--segmenter-sha256")
    if args.experiment is None:
        return None
    cfg = PreprocessConfig.from_dict(_experiment_preprocess(args.experiment), source=f"{args.experiment}: preprocess")
    return None if cfg.masks == "drawn" else cfg


def _mask_source_report(site_dir: Path, cfg, cache_dir: str | None) -> dict:
    """Per patient and view where each structure's mask comes from, and the counts."""
    from collections import Counter

    from shared_model.sitedata.cache import check_cache_dir, default_cache_dir
    from shared_model.sitedata.contract import load_site
    from shared_model.sitedata.mask_source import mask_sources

    site = load_site(site_dir, cfg.inputs)
    sources = mask_sources(site, cfg, check_cache_dir(default_cache_dir(cache_dir), site.root))
    counts = Counter(f"{view} {structure} {source}" for views in sources.values()
                     for view, row in views.items() for structure, source in row.items())
    return {"masks": cfg.masks, "segmenter_sha256": cfg.segmenter_sha256, "counts": dict(sorted(counts.items())),
            "patients": sources}


def _mask_source_lines(found: dict) -> list[str]:
    from shared_model.sitedata.records import VIEWS
    from shared_model.text_table import format_table

    rows = []
    for view in VIEWS:
        for structure in ("thyroid", "nodule"):
            rows.append([f"{view} {structure}"] + [found["counts"].get(f"{view} {structure} {source}", 0)
                                                   for source in ("drawn", "predicted", "missing")])
    return [f"\nmask sources (preprocess.masks: {found['masks']}, segmenter {found['segmenter_sha256'][:12]}...):",
            *format_table(["mask", "drawn", "predicted", "missing"], rows)]


def _experiment_preprocess(path: Path) -> dict:
    """The `preprocess` section of an experiment file ({} when it has none); unreadable YAML is a ConfigError."""
    import yaml

    from shared_model.config import ConfigError

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot be read as YAML: {exc}") from None
    return (data.get("preprocess") or {}) if isinstance(data, dict) else {}


def _experiment_inputs(path: Path):
    """The `preprocess.inputs` of an experiment file (the defaults when it declares none)."""
    from shared_model.config import InputsConfig

    section = _experiment_preprocess(path).get("inputs")
    return InputsConfig.from_dict(section or {}, source=f"{path}: preprocess.inputs")


def run(args: argparse.Namespace) -> int:
    site_dir: Path = args.site_dir
    if not site_dir.exists():
        print(f"llnm-site check: {site_dir} does not exist", file=sys.stderr)
        return EXIT_NO_SITE
    if not site_dir.is_dir():
        print(
            f"llnm-site check: {site_dir} is not a folder (give the site folder holding patients.csv)",
            file=sys.stderr,
        )
        return EXIT_NO_SITE

    from shared_model.sitedata.check import check_site  # imported late: keeps `llnm-site --help` fast

    inputs = None
    if args.experiment is not None:
        from shared_model.config import ConfigError

        try:
            inputs = _experiment_inputs(args.experiment)
        except ConfigError as exc:
            print(f"llnm-site check: {exc}", file=sys.stderr)
            return EXIT_NO_SITE
    report = check_site(site_dir, deep=not args.quick, frame=args.frame, inputs=inputs)
    sources = None
    try:
        cfg = _mask_config(args)
        if cfg is not None:
            sources = _mask_source_report(site_dir, cfg, args.cache_dir)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        print(f"llnm-site check: mask sources: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    if args.json:
        data = report.to_dict()
        if sources is not None:
            data["mask_sources"] = sources
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(report.format_text())
        if sources is not None:
            print("\n".join(_mask_source_lines(sources)))
    return EXIT_USABLE if report.usable else EXIT_ERRORS
