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
        "--experiment", type=Path, metavar="CONFIG.yaml",
        help="judge the table against this experiment's preprocess.inputs (what its rounds would ask of the "
        "site) instead of the site's own declaration in site.yaml",
    )


def _experiment_inputs(path: Path):
    """The `preprocess.inputs` of an experiment file (the defaults when it declares none)."""
    import yaml

    from shared_model.config import ConfigError, InputsConfig

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot be read as YAML: {exc}") from None
    section = (data.get("preprocess") or {}).get("inputs") if isinstance(data, dict) else None
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
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.format_text())
    return EXIT_USABLE if report.usable else EXIT_ERRORS
