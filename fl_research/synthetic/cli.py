"""``llnm-synth``: write a synthetic consortium of site folders (see docs/synthetic.md)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .annotation import Annotation
from .generator import DEFAULT_IMAGE_SIZE, DEFAULT_PATIENTS, generate_consortium
from .profiles import LAYOUTS, PAPER_PATIENTS, PAPER_SIZED_PROFILES


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface; the defaults match ``make demo``'s expectations."""
    parser = argparse.ArgumentParser(
        prog="llnm-synth",
        description="Generate a synthetic multi-centre LLNM consortium: one folder per site in the site data "
        "contract, hidden truth in OUT/truth/, parameters and reference AUCs in OUT/consortium.json.",
    )
    parser.add_argument(
        "--out", required=True, help="output folder (must be empty or absent, see --overwrite)"
    )
    parser.add_argument("--sites", type=int, default=7,
                        help="number of sites, 1-999 (default 7): the seven synthetic hospitals, then seeded "
                             "variants of them (site-008, ...) with drawn sizes")
    parser.add_argument(
        "--profile",
        choices=sorted(LAYOUTS),
        default="default",
        help="'default' (two large development hospitals, five smaller external ones, for the demo), 'paper' "
        "(the paper's proportions: the two development hospitals hold 75%% of all patients, the five external "
        "ones 25%%) or 'paper-calibrated' (the paper's proportions, a risk function whose own attribution "
        "matches the paper's feature shares, and briefer reports); with either paper profile --patients "
        f"defaults to the paper's {PAPER_PATIENTS:,}",
    )
    parser.add_argument(
        "--patients",
        type=int,
        default=None,
        help=f"TOTAL number of patients over all sites; the layout is scaled to it "
        f"(default {DEFAULT_PATIENTS}, or {PAPER_PATIENTS} with a paper profile; at least 8 per site)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed; same seed and arguments give byte-identical output (default 0)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        help=f"image rows in pixels (columns follow each site's aspect ratio; the field of "
        f"view stays fixed, so pixel spacing scales with 256/size) (default "
        f"{DEFAULT_IMAGE_SIZE})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="rendering processes (default: CPU count); never changes the output",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing llnm-synth output in --out"
    )
    parser.add_argument(
        "--drawn-masks", type=float, default=1.0, metavar="FRACTION",
        help="fraction of each annotating site's patients whose masks are drawn (default 1); the others' mask "
        "cells stay empty and their masks go to OUT/truth/masks/SITE/ for scoring, as a hospital that drew only "
        "some masks",
    )
    parser.add_argument(
        "--drawn-masks-sites", default=None, metavar="SITE,SITE",
        help="the sites that drew any masks (default: all); the others have none",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llnm-synth`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.patients is None:
        args.patients = PAPER_PATIENTS if args.profile in PAPER_SIZED_PROFILES else DEFAULT_PATIENTS
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"llnm-synth: {done}/{total} patients rendered ({rate:.1f}/s)", file=sys.stderr, flush=True)

    sites = None
    if args.drawn_masks_sites is not None:
        sites = tuple(name.strip() for name in args.drawn_masks_sites.split(",") if name.strip())
    try:
        annotation = Annotation(fraction=args.drawn_masks, sites=sites)
        summary = generate_consortium(
            args.out,
            sites=args.sites,
            patients=args.patients,
            seed=args.seed,
            image_size=args.image_size,
            workers=args.workers,
            overwrite=args.overwrite,
            layout=args.profile,
            progress=progress,
            annotation=annotation,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"llnm-synth: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        pooled = summary["pooled"]
        auc = pooled["auc"]["all"]
        print(
            f"llnm-synth: wrote {pooled['n']} patients in {len(summary['sites'])} sites to {args.out} "
            f"in {time.perf_counter() - started:.1f} s"
        )
        for name, site in summary["sites"].items():
            print(
                f"  {name}: n={site['n']:5d} prevalence={site['prevalence']:.3f} "
                f"({site['vendor']['manufacturer']} {site['vendor']['model']})"
            )
        print(
            f"  pooled prevalence {pooled['prevalence']:.3f}; AUC bayes {auc['bayes']} image {auc['image']} "
            f"report {auc['report']} clinical {auc['clinical']}"
        )
        drawn = summary["drawn_masks"]
        if drawn["fraction"] != 1.0 or drawn["sites"] != "all":
            print("  patients with drawn masks: " + ", ".join(f"{site} {n}" for site, n in
                                                            drawn["patients_with_masks"].items())
                  + f" (the others' masks are in {args.out}/truth/masks/)")
        truth = summary["truth_shares"]["pooled"]["all"]
        paper = summary["truth_shares"]["paper"]
        print("  generator's feature-group shares (paper's): "
              + ", ".join(f"{g} {100 * v:.1f}% ({100 * paper[g]:.1f}%)" for g, v in truth.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
