"""`llnm-server report RUN_DIR [--compare DIR ...]`: RUN_DIR/report.html (one offline page) and report.json.

Training curves, the final evaluation per site with its CIs, per-site ROC, calibration and decision curves
(from the sites' final score histograms), compared runs (baselines or other federations), the privacy
guarantee, and every site failure or refusal by round. Built from the run directory alone: no site is asked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="the run directory (of llnm-server run or simulate)")
    p.add_argument("--compare", type=Path, nargs="*", default=[], metavar="DIR",
                   help="run directories to show side by side (llnm-server baseline pooled/local, other runs)")


def run(args: argparse.Namespace) -> int:
    from fl_server.report import write_report

    for path in [args.run_dir, *args.compare]:
        if not (path / "metrics.json").is_file():
            print(f"error: {path} has no metrics.json: not a run directory", file=sys.stderr)
            return 2
    json_path, html_path = write_report(args.run_dir, args.compare)
    print(f"report: {html_path}")
    print(f"numbers: {json_path}")
    return 0
