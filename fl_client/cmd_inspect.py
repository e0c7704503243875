"""`llnm-site inspect FILE`: show what llnm-fl reads from one ultrasound image file.

A site operator uses this before training to see, for a single export, how many frames it has, how its
colour was handled, and whether (and from where) a physical pixel size was found. It decodes the pixels, so
a file that prints here will also load in training; an unusable one gives ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _frame(value: str) -> str | int:
    """`first`, `middle`, `last` or a 0-based frame index, as the preprocessing config accepts."""
    from shared_model.config import parse_frame

    try:
        return parse_frame(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register FILE and --frame on the `inspect` sub-command."""
    parser.add_argument("file", metavar="FILE", help="DICOM, PNG or JPEG ultrasound image")
    parser.add_argument(
        "--frame",
        type=_frame,
        default="middle",
        help="frame of a cine file: first, middle (default: frames // 2), last or a 0-based index",
    )


def run(args: argparse.Namespace) -> int:
    """Print the file's description as indented JSON; on an unusable file print the reason and return 2."""
    from shared_model.sitedata.imaging import ImageReadError, inspect_file

    try:
        info = inspect_file(args.file, frame=args.frame)
    except ImageReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0
